"""The GPU check: one command that builds, tests and times the CUDA path on a bare GPU machine.

``scripts/gpu_check.sh`` runs each section in its own process under its own time limit, then
``report``; run one section by hand, from the repository root, with

    python -m benchmarks.gpu_check SECTION --out DIR [--budget SECONDS] [--rehearsal]

The sections, one module each: ``env`` (what the machine is), ``build`` (the extensions for the
visible GPU, timed), ``scan`` (the scan against the copy roofline), ``baseline`` (the per-line release
kernel as the paper describes it, in Triton), ``mixer`` (a GSPN mixer against flash attention),
``train`` (a gspn_t training step), ``gen`` (GSPN-DiT-XL/2 and DiT-XL/2 training steps), ``sdxl`` (an
SD-XL UNet step with GSPN against SDPA self-attention) and ``profile`` (the top kernels of two training
steps).  Each has ``run(args, rec)``, which measures into the section's record, and (but ``env``)
``table(data)``, its lines of the report.  The tests section is pytest itself, run by the script.
``harness`` holds what the sections share (the record, timing, memory, budgeted case loops);
``report`` makes ``gpu_check.{json,md}`` of the sections' files, and ``compare`` puts the results of
two or more trees side by side.

Every section writes ``DIR/<section>.json`` after each case it finishes, so a section that is killed
by its time limit still leaves what it measured.  ``--rehearsal`` runs the same code on the CPU with
tiny sizes (``bash scripts/gpu_check.sh --cpu-rehearsal``; a test runs it), so the check cannot rot
while no GPU is around.  Timing: CUDA events around each call, warm-up first, median of the repeats;
on the CPU (rehearsal) wall-clock time.  The figures mean nothing in a rehearsal.
"""

# in the order scripts/gpu_check.sh runs them (the tests section, pytest, runs after build)
SECTIONS = ("env", "build", "scan", "baseline", "mixer", "train", "gen", "sdxl", "profile")
