#!/usr/bin/env bash
# The recipe of capcli's shipped default model: Flickr8k (train + restval to train, val to select),
# EfficientNet-Lite0 features, Show, Attend and Tell (the default) and Show and Tell.
#
#   recipes/flickr8k-default.sh [all|prepare|features|attention|scst|basic|evaluate|ship]
#
# DATA: the Flickr8k folder (captions.json + splits.json + images/, as in ../shared/data/flickr8k)
# CAPCLI_HOME: the data root where datasets, features and runs go.
# THREADS: torch threads per training job (the two trainings can run side by side, one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/flickr8k}
export CAPCLI_HOME=${CAPCLI_HOME:-$HOME/.capcli}
export OMP_NUM_THREADS=${THREADS:-2}
RUNS=$CAPCLI_HOME/runs
stage=${1:-all}

run_prepare() { capcli prepare "$DATA" --name flickr8k; }

run_features() { capcli features flickr8k --encoder efficientnet-lite0 --batch-size 32 --workers 1; }

# Settings chosen on Flickr8k val (see README, "The default model"): the doubly stochastic weight is
# lambda = 0.02 (about 1/L for L = 49 regions, i.e. the per-region mean), label smoothing 0.1, lr 5e-4;
# attention peaks after 4 epochs and then overfits (epoch 5 is worse), so 5 epochs; best.pt is epoch 4.
run_attention() {
  capcli train --arch attention --dataset flickr8k --out "$RUNS/flickr8k-attention" --overwrite \
    --encoder efficientnet-lite0 --embed-dim 512 --hidden-dim 512 --attention-dim 512 --dropout 0.5 --cell lstm \
    --min-count 5 --max-len 20 --epochs 5 --batch-size 64 --lr 5e-4 --grad-clip 5.0 --alpha-c 0.02 \
    --label-smoothing 0.1 --schedule plateau --patience 2 --select cider --val-split val --val-beam 1 \
    --seed 0 --save-dtype float16
}

# Self-critical sequence training (CIDEr-D reward, 5 samples per image, each one's baseline the mean of the
# other four) from the cross-entropy model above: what ships as the default. A low constant lr; best.pt is
# the epoch with the best greedy val CIDEr.
run_scst() {
  capcli train --arch attention --dataset flickr8k --out "$RUNS/flickr8k-attention-scst" --overwrite \
    --init-from "$RUNS/flickr8k-attention/best.pt" --scst --scst-samples 5 \
    --max-len 20 --epochs 8 --batch-size 32 --lr 5e-5 --grad-clip 5.0 --alpha-c 0 --label-smoothing 0 \
    --schedule none --patience 0 --select cider --val-split val --val-beam 1 --seed 0 --save-dtype float16
}

run_basic() {
  capcli train --arch basic --dataset flickr8k --out "$RUNS/flickr8k-basic" --overwrite \
    --encoder efficientnet-lite0 --embed-dim 512 --hidden-dim 512 --dropout 0.5 --cell lstm --condition first-step \
    --min-count 5 --max-len 20 --epochs 12 --batch-size 64 --lr 1e-3 --grad-clip 5.0 \
    --label-smoothing 0.1 --schedule plateau --patience 3 --select cider --val-split val --val-beam 1 \
    --seed 0 --save-dtype float16
}

run_evaluate() {
  for run in attention-scst attention basic; do
    capcli evaluate "$RUNS/flickr8k-$run/best.pt" --data flickr8k --split val --beam 3 \
      --out "$RUNS/flickr8k-$run" --html "$RUNS/flickr8k-$run/report.html"
  done
}

# Every checkpoint `capcli train` writes carries its training photos' familiarity (capcli/familiar.py, for
# grounding). The shipped ones were trained before that: scripts/fit_familiarity.py added it to them.
run_ship() {
  mkdir -p capcli/assets
  cp "$RUNS/flickr8k-attention-scst/best.pt" capcli/assets/flickr8k-attention.pt
  cp "$RUNS/flickr8k-basic/best.pt" capcli/assets/flickr8k-basic.pt
}

case $stage in
  all) run_prepare; run_features; run_attention; run_scst; run_basic; run_evaluate; run_ship ;;
  prepare|features|attention|scst|basic|evaluate|ship) "run_$stage" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
