#!/usr/bin/env bash
# perf/gpu_session.sh STEP...: a GPU session's work, in steps sized to the device tool's
# 10-minute commands (30 minutes of device time in all), run from the repository root.
# Everything a step produces goes under $OUT (the device tool's folder that comes back;
# perf/results/gpu-session here when unset). Several steps may share one command. The next
# session's calls (perf/NOTES.md, session 29), each started within 30 s of the last one's
# reply, or the machine is given back and the next call starts a bare one:
#   bash perf/gpu_session.sh setup tests          (the suite: cut at 540 s in session 29 with
#                                                  12 of 649 tests not run, under loadfile)
#   bash perf/gpu_session.sh setup host kernels e2e  (where the host time goes on the GPU,
#                                                  direct launches against JITFunction.run's;
#                                                  per-kernel times, passes A and B against
#                                                  session 32's prediction; e2e with compiled
#                                                  models)
#   RESUME_FROM=<carried dir holding session 29's tuned.json>
#   STEP_TIMEOUT=270 bash perf/gpu_session.sh setup bf16 tune  (the sweep afresh: session 29's
#                                                  CSV timed the kernels before pass B stopped
#                                                  reading dy; the table resumed, plus passes
#                                                  A and B's new keys)
# `setup` comes first in every call: a machine keeps nothing between starts.
#
# Steps:
#   setup   install this package offline (the device image has torch, Triton, pytest, timm,
#           matplotlib and no network) and record the device, torch and Triton
#   host    perf/host_time.py on this machine's CPU (its host time per CBAM call), with one
#           config per launch and with the candidates, then on the GPU with nothing stubbed
#           (plans' direct launches, then each replay through JITFunction.run: session 33's
#           prediction) and where a training step's host time goes (--profile), then with
#           only the Triton kernels' run stubbed (--device cuda-stub); a minute or two
#   tests   the whole suite on CUDA, log in $OUT/tests.log (a failure does not stop later steps)
#   accuracy  perf/accuracy.py for 60 s in bf16, fp16 and fp32 (rule configs): the compiled
#           kernels' errors against float64 beside timm's own, $OUT/accuracy.{csv,log}
#   tune    perf/tune.py for the sweep's shapes: $OUT/tuned.json, to commit under kernels/tuned/
#           (as <gpu>__triton-<version>.json; like the sweep steps it resumes RESUME_FROM's)
#   l2      triton against triton-l2 (the L2-aware order), ResNet-50 shapes, bf16, both modes:
#           decides the order's default (perf/NOTES.md, v2)
#   bf16    the sweep's ResNet-50 and neck shapes in bf16, every provider (issue 3's targets)
#   fp32    the same in fp32;  fp16: in fp16
#   e2e     the ResNet-50 end-to-end training step alone
#   align   v3's row alignment on and off: a CBAM training step (rule config) on NCHW x with
#           rows of 196 pixels (1024x14x14), bf16 and fp32, batch 32 and 128 (perf/NOTES.md, v3)
#   kernels perf/kernel_times.py: each kernel's GPU time in a training step and an inference
#           forward (torch.profiler), GB/s on its own bytes, and the small ops' kernels, at
#           ResNet-50's shapes, batch 32 and 128, bf16, both layouts (16 cases, a minute or two);
#           then again with CBAM_TRITON_CHANNEL_PARTIALS=0 (passes A and B as before session 32)
#   capture perf/capture_check.py: which training steps capture in a CUDA graph (session 26's
#           failure, perf/NOTES.md), 20 cases in processes of their own, a minute or two;
#           the two `leak` cases re-create its cause and are predicted to fail, no other one
# Each step is bounded by `timeout` (below: STEP_TIMEOUT, and what is left of the call's
# CALL_BUDGET) so that one slow step cannot eat the command's 10 minutes. A sweep step starts
# no case in its last 150 s (--time-budget) and rewrites its CSV after every case, so a step
# cut short keeps what it measured; with RESUME_FROM=DIR (a folder holding an earlier call's
# CSVs, carried to the device) a step resumes DIR/<step>.csv and runs only the cases missing
# from it (--resume), so a sweep that needs more than one call is finished by the next.
set -uo pipefail

OUT="${OUT:-perf/results/gpu-session}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

# Each step is bounded by STEP_TIMEOUT, and by what is left of the call's CALL_BUDGET (the
# device tool's 10 minutes a command, less a margin, counted from this script's start): several
# steps in one call must together fit, or the tool kills the call mid-step. A step with under
# 30 s left is skipped and says so.
STEP_TIMEOUT="${STEP_TIMEOUT:-540}"
CALL_BUDGET="${CALL_BUDGET:-590}"

carry_over() {  # carry_over FILE: an earlier call's $RESUME_FROM/FILE into $OUT, to resume
    if [ -n "${RESUME_FROM:-}" ] && [ -f "$RESUME_FROM/$1" ] \
            && ! [ "$RESUME_FROM/$1" -ef "$OUT/$1" ]; then
        cp "$RESUME_FROM/$1" "$OUT/$1"
    fi
}

sweep() {  # sweep NAME ARGS...: one bounded piece of the sweep, CSV and log under $OUT
    local name="$1"
    shift
    carry_over "$name.csv"
    # The whole output, a line per progress step: a case's CHECK FAILED or NOTE line (its
    # results against float64: perf/sweep.py's `check`) stays beside the case it is about.
    timeout "$T" "$PY" perf/sweep.py "$@" --out "$OUT/$name.csv" --resume \
        --time-budget "$BUDGET_MIN" 2>&1 | tr '\r' '\n' > "$OUT/$name.log"
    echo "$name: exit ${PIPESTATUS[0]} ($(grep -c . "$OUT/$name.csv" 2>/dev/null) CSV lines;" \
        "$(grep -c 'CHECK FAILED' "$OUT/$name.log") cases of ours failed the check," \
        "$(grep -c 'NOTE' "$OUT/$name.log") notes on baselines;" \
        "$(grep -o 'not run ([0-9]*' "$OUT/$name.log" | tr -d '(' || true); log $OUT/$name.log)"
}

for step in "$@"; do
    left=$(( CALL_BUDGET - SECONDS ))  # SECONDS counts from this script's start
    if (( left < 30 )); then
        echo "$step: skipped, ${left}s left of this call's ${CALL_BUDGET}s"
        continue
    fi
    T=$(( left < STEP_TIMEOUT ? left : STEP_TIMEOUT ))  # this step's bound
    # A sweep or a tuning starts no case in its last 150 s (or half its time, when shorter).
    BUDGET_MIN="$(awk "BEGIN { m = $T - 150; if (m < $T / 2) m = $T / 2; print m / 60 }")"
    case "$step" in
        setup)
            if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
                    > "$OUT/setup.log" 2>&1; then
                # No network there to fetch a build backend: an image whose setuptools is
                # older than pyproject.toml asks for cannot build the package. Import it from
                # this tree instead, laid out as installed (kernels/ as cbam_triton/kernels, a
                # link in the device's copy of the tree only); every later step of this
                # command, and the tests' subprocesses, inherit the path.
                ln -sfn ../kernels cbam_triton/kernels
                export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
                echo "setup: pip could not install the package; importing it from $PWD" \
                    >> "$OUT/setup.log"
            fi
            nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem \
                --format=csv >> "$OUT/setup.log" 2>&1
            "$PY" -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__,
triton.__version__, torch.cuda.get_device_properties(0).L2_cache_size)" >> "$OUT/setup.log" 2>&1
            "$PY" -c "import cbam_triton.kernels; print('cbam_triton from', cbam_triton.__file__)" \
                >> "$OUT/setup.log" 2>&1
            tail -n 4 "$OUT/setup.log"
            ;;
        host)
            # One config per launch (a tuned table's), then the untabled default's candidates.
            # Then nothing stubbed, on the GPU, with where the host time goes (torch.profiler),
            # and on the GPU with only the Triton kernels' run stubbed: the difference is what
            # Triton's own launches cost there.
            timeout "$T" sh -c '"$0" perf/host_time.py && "$0" perf/host_time.py --candidates \
                && "$0" perf/host_time.py --device cuda --profile 45 \
                && "$0" perf/host_time.py --device cuda-stub' \
                "$PY" > "$OUT/host_time.log" 2>&1
            echo "host: exit $? ($(grep -E '^(train|forward)' "$OUT/host_time.log" | tr -s ' ' \
                | tr '\n' ';'))"
            ;;
        tests)
            # The image has pytest-xdist; the tests run in 8 processes, sharing the GPU, each
            # test to whichever process is free (--dist load, as scripts/test.sh): with whole
            # files per process (loadfile), session 29's run started test_compile.py, all in
            # one process, only after 58% of the tests, and the 540 s bound cut it with 10 of
            # its tests not run (the CUDA compile and export ones among them).
            # -v: a line per finished test, so a run cut by the timeout still says what ran.
            timeout "$T" "$PY" -m pytest -v -p no:cacheprovider -n 8 --dist load \
                -rfEs --durations=15 > "$OUT/tests.log" 2>&1
            echo "tests: exit $? ($(tail -n 1 "$OUT/tests.log"))"
            ;;
        accuracy)
            CBAM_TRITON_AUTOTUNE=0 timeout "$T" "$PY" perf/accuracy.py --seconds 60 \
                --dtypes bf16,fp16,fp32 --out "$OUT/accuracy.csv" > "$OUT/accuracy.log" 2>&1
            echo "accuracy: exit $? ($(head -n 1 "$OUT/accuracy.log"))"
            ;;
        tune)
            carry_over tuned.json
            timeout "$T" "$PY" perf/tune.py --out "$OUT/tuned.json" --resume \
                --time-budget "$BUDGET_MIN" > "$OUT/tune.log" 2>&1
            echo "tune: exit $? ($(tail -n 1 "$OUT/tune.log"))"
            ;;
        l2)
            sweep l2 --providers triton,triton-l2 --presets resnet50 --dtypes bfloat16 --no-e2e
            ;;
        bf16 | fp32 | fp16)
            dtype="$(sed 's/bf16/bfloat16/; s/fp32/float32/; s/fp16/float16/' <<< "$step")"
            sweep "sweep_$step" --dtypes "$dtype" --no-e2e
            ;;
        e2e)
            sweep e2e --e2e-only
            ;;
        align)
            CBAM_TRITON_AUTOTUNE=0 timeout "$T" "$PY" - > "$OUT/align.log" 2>&1 <<'PY'
import torch, triton
from cbam_triton import CBAM
from cbam_triton.kernels import _common
row_alignment = _common.row_alignment
for dtype in (torch.bfloat16, torch.float32):
    for n in (32, 128):
        cbam = CBAM(1024).cuda().to(dtype)
        x = torch.randn(n, 1024, 14, 14, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        times = {}
        for align in ("aligned", "unaligned"):
            _common.row_alignment = row_alignment if align == "aligned" else (lambda *a: 1)
            _common.clear_launch_plans()  # or the second setting replays the first's launches
            step = lambda: torch.autograd.grad(cbam(x), (x,), dy)
            times[align] = triton.testing.do_bench(step, return_mode="median")
        print(f"{str(dtype)[6:]} N={n}: aligned {times['aligned']:.4f} ms, unaligned "
              f"{times['unaligned']:.4f} ms, speedup {times['unaligned'] / times['aligned']:.3f}x")
PY
            echo "align: exit $? ($(tail -n 4 "$OUT/align.log" | tr '\n' ' '))"
            ;;
        kernels)
            # Then the backward as before session 32 (pass B reads dy; pass A sums nothing for
            # it): the A/B of session 32's prediction, in one run on one GPU.
            timeout "$T" sh -c '"$0" perf/kernel_times.py > "$1/kernel_times.log" 2>&1 \
                && CBAM_TRITON_CHANNEL_PARTIALS=0 "$0" perf/kernel_times.py \
                > "$1/kernel_times_no_partials.log" 2>&1' "$PY" "$OUT"
            echo "kernels: exit $? ($(grep -c 'step on the GPU' "$OUT/kernel_times.log") cases;" \
                "log $OUT/kernel_times.log, $OUT/kernel_times_no_partials.log)"
            ;;
        capture)
            CBAM_TRITON_AUTOTUNE=0 timeout "$T" "$PY" perf/capture_check.py \
                > "$OUT/capture.log" 2>&1
            echo "capture: exit $? ($(grep -c FAIL "$OUT/capture.log") of 20 cases failed;" \
                "$(grep FAIL "$OUT/capture.log" | grep -c leak) of them leak cases)"
            ;;
        *)
            echo "unknown step: $step (see the top of $0)" >&2
            exit 2
            ;;
    esac
done
