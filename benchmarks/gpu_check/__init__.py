"""The GPU check: one command that builds, tests and times the CUDA path on a bare GPU machine.

``scripts/gpu_check.sh`` runs each section in its own process under its own time limit, then
``report``; run one section by hand, from the repository root, with

    python -m benchmarks.gpu_check SECTION --out DIR [--budget SECONDS] [--rehearsal]

The default run is issue 24's check of the channels-last propagation kernel, about seven minutes
with the build: ``env`` (what the machine is), ``build`` (the extensions for the visible GPU, timed),
``correct`` (``gspn_propagate_proj``, new op and old path, against the float64 reference, fp32 and
bf16, forward and gradients), ``profile`` (the top kernels of the mixer's fwd+bwd, old and new),
``mixer`` (the mixer old / new against flash attention, time and peak memory) and ``directions`` (the
op per scan direction, old and new).  The older sections run when named in ``GPU_CHECK_SECTIONS``:
``tests`` (pytest, run by the script), ``scan`` (the scan against the copy roofline), ``baseline`` (the
per-line release kernel as the paper describes it, in Triton), ``train`` (a gspn_t training step),
``gen`` (GSPN-DiT-XL/2 and DiT-XL/2 training steps), ``sdxl`` (an SD-XL UNet step with GSPN against
SDPA self-attention), ``train_profile`` (the top kernels of two training steps) and ``tile`` (the
local tile kernels of chunked layers against the lane kernels, forward: errors, then time).  Each has
``run(args, rec)``, which measures into the section's record, and (but ``env``) ``table(data)``, its
lines of the report.  ``harness`` holds what the sections share (the record, timing, memory, budgeted
case loops, the profiler table); ``report`` makes ``gpu_check.{json,md}`` of the sections' files with
issue 24's acceptance table, and ``compare`` puts the results of two or more trees side by side.

Every section writes ``DIR/<section>.json`` after each case it finishes, so a section that is killed
by its time limit still leaves what it measured, and ``DIR/<section>.md`` (its table) when it ends.  ``--rehearsal`` runs the same code on the CPU with
tiny sizes (``bash scripts/gpu_check.sh --cpu-rehearsal``; a test runs it), so the check cannot rot
while no GPU is around.  Timing: CUDA events around each call, warm-up first, median of the repeats;
on the CPU (rehearsal) wall-clock time.  The figures mean nothing in a rehearsal.
"""

#: issue 24's check, what ``scripts/gpu_check.sh`` runs by default, in its order
DEFAULT_SECTIONS = ("env", "build", "correct", "profile", "mixer", "directions")
#: the older sections, run when named (``tests``, pytest, is run by the script itself, after build)
OTHER_SECTIONS = ("scan", "baseline", "train", "gen", "sdxl", "train_profile", "tile")
#: every Python section, in the report's order
SECTIONS = DEFAULT_SECTIONS + OTHER_SECTIONS
