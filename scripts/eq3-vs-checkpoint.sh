#!/usr/bin/env bash
# IEU's CA cost against the starting checkpoint (BadNets-white on CIFAR-10, cpu scale):
# runs experiments/eq3-vs-checkpoint/spec.yaml at each scale of the scales.yaml beside it
# (pretrains of 3, 10 and 30 epochs, everything else the cpu scale's) and writes one table
# with the checkpoint's test accuracy and calibration, no defence's and IEU's CA and ASR,
# the gate, and Eq. 3's mean factor and mean unlearning loss; beside it, in figures/, the
# per-step Eq. 3 trace of each IEU cell (CSV and plot).
#
#   scripts/eq3-vs-checkpoint.sh DATA_DIR [STORE] [OUT]
#       DATA_DIR  holds cifar-10-batches-bin/
#       STORE     the artefact store (default: artifacts)
#       OUT       the table (default: reports/eq3-vs-checkpoint-cifar10-cpu.md)
#   IEU_BENCH=path/to/ieu-bench to use a built binary (default: cargo run --release), and
#   IEU_COMMIT=REV to name the commit it was built from (default: this checkout's HEAD).
#
# Cost on 2 cores: about 45 minutes from a fresh store (the pretrains take 2.5, 8 and
# 25 minutes); steps already stored are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/eq3-vs-checkpoint.sh DATA_DIR [STORE] [OUT]}
STORE=${2:-artifacts}
OUT=${3:-reports/eq3-vs-checkpoint-cifar10-cpu.md}
SPEC=experiments/eq3-vs-checkpoint/spec.yaml
SCALES="ckpt-3ep ckpt-10ep ckpt-30ep"
if [ -n "${IEU_BENCH:-}" ]; then BIN=("$IEU_BENCH"); else BIN=(cargo run --release -q --); fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for s in $SCALES; do
  "${BIN[@]}" run "$SPEC" --scale "$s" --data-dir "$DATA" --store "$STORE"
  "${BIN[@]}" report "$SPEC" --scale "$s" --data-dir "$DATA" --store "$STORE" \
    --format csv --out "$tmp/$s.csv" --figures "$tmp/fig-$s"
  # The per-step Eq. 3 trace of the IEU cell (one CSV row per unlearned batch) and its plot.
  mkdir -p "$(dirname "$OUT")/figures"
  for ext in csv png svg; do
    cp "$tmp/fig-$s/eq3-trace.$ext" "$(dirname "$OUT")/figures/eq3-trace-cifar10-badnets-white-$s.$ext"
  done
done

COMMIT=${IEU_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 - "$OUT" "$tmp" "$COMMIT" $SCALES <<'EOF'
import csv, sys
from collections import defaultdict
out, tmp, commit, scales = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def f(v, nd=2):
    return "–" if v in ("", None) else f"{float(v):.{nd}f}"
rows = []
for s in scales:
    cells = {r["defence"]: r for r in csv.DictReader(open(f"{tmp}/{s}.csv"))}
    n, i = cells["none"], cells["ieu"]
    cost = float(n["ca"]) - float(i["ca"])
    rows.append(f"| `{s}` | {f(n['pretrain_accuracy'])} | {f(n['pretrain_confidence'])} "
                f"| {f(n['ca'])} | {f(n['asr'])} | {f(i['ca'])} | {f(i['asr'])} | {cost:.2f} "
                f"| {f(i['poison_flagged'])} | {f(i['clean_flagged'])} | {f(i['unlearn_steps'], 0)} "
                f"| {f(i['unlearn_factor'])} | {f(i['unlearn_loss'])} |")
# Per epoch of stage 2: Eq. 3's factor and the unlearning loss, and how often the factor
# sits at its floor.
epochs = []
for s in scales:
    by = defaultdict(list)
    for r in csv.DictReader(open(f"{tmp}/fig-{s}/eq3-trace.csv")):
        by[int(r["epoch"])].append((float(r["factor"]), float(r["loss"])))
    for e, rs in sorted(by.items()):
        fs, ls = [f for f, _ in rs], [l for _, l in rs]
        floor = sum(1 for f in fs if f <= 0.2 + 1e-9)
        epochs.append(f"| `{s}` | {e} | {len(rs)} | {sum(fs)/len(fs):.2f} | {min(fs):.2f}–{max(fs):.2f} "
                      f"| {sum(ls)/len(ls):.2f} | {min(ls):.2f}–{max(ls):.2f} | {floor} |")
with open(out, "w") as fh:
    fh.write(f"""# IEU's CA cost against the starting checkpoint (CIFAR-10, BadNets-white, cpu scale)

Written by `scripts/eq3-vs-checkpoint.sh` (ieu-bench at commit {commit}). The three
checkpoints differ only in pretraining epochs (`experiments/eq3-vs-checkpoint/scales.yaml`);
finetuning is the cpu scale's (8 epochs, lr 5·10⁻⁴, 10 000 poisoned images at rate 0.1),
CA and ASR on the whole test split. *confidence*: mean max-softmax probability of the
checkpoint on the clean test split. *Eq. 3 factor*: mean of lr_ul / lr_tune =
max(6 − e^(ℓ/√2)/N_c, 0.2) over IEU's unlearning steps; *unlearn loss*: mean cross-entropy
ℓ of the unlearned batches against their (poisoned) labels. With N_c = 10 the factor
reaches its floor only when ℓ ≥ √2·ln(58) ≈ 5.74.

| checkpoint | accuracy % | confidence % | none CA | none ASR | IEU CA | IEU ASR | CA cost | gate: poison % | gate: clean % | unlearn steps | Eq. 3 factor | unlearn loss |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
""" + "\n".join(rows) + """

Eq. 3 over stage 2, per epoch (from the per-step traces in `figures/`; the first unlearned
batch of every epoch has k = 0 and factor 1):

| checkpoint | epoch | unlearned batches | mean factor | factor range | mean loss | loss range | at the 0.2 floor |
|---|---:|---:|---:|---|---:|---|---:|
""" + "\n".join(epochs) + "\n")
print(open(out).read())
EOF
