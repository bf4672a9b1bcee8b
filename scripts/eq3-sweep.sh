#!/usr/bin/env bash
# IEU's CA cost and Eq. 3 across the scales of one experiment (cpu-scale variants):
# runs experiments/EXPERIMENT/spec.yaml at each scale of the scales.yaml beside it, in file
# order, and writes one table with the checkpoint's test accuracy and calibration, no
# defence's and IEU's CA and ASR, the gate, and Eq. 3's mean factor and mean unlearning
# loss; then Eq. 3 per epoch of stage 2, and beside the table, in figures/, the per-step
# Eq. 3 trace of each scale's IEU cell on the spec's first figure panel (CSV and plot).
#
#   scripts/eq3-sweep.sh EXPERIMENT DATA_DIR [STORE] [OUT]
#       EXPERIMENT  eq3-vs-checkpoint (CIFAR-10, pretrains of 3, 10 and 30 epochs),
#                   eq3-vs-tune-lr (CIFAR-10, f_r's finetuning rate 5e-4, 1e-4, 2e-5),
#                   default-tune-lr (the synthetic default, finetuning rate 5e-4, 2e-4, 1e-4) or
#                   default-tune-epochs (the synthetic default, f_r finetuned 8 or 10 epochs)
#       DATA_DIR    holds cifar-10-batches-bin/ (any directory for the synthetic dataset)
#       STORE       the artefact store (default: artifacts)
#       OUT         the table (default: reports/EXPERIMENT-DATASET-cpu.md)
#   IEU_BENCH=path/to/ieu-bench to use a built binary (default: cargo run --release),
#   IEU_COMMIT=REV to name the commit it was built from (default: this checkout's HEAD), and
#   SCALES="a b" to run only some of the experiment's scales.
#
# Cost on 2 cores, from a fresh store: eq3-vs-checkpoint about 35 minutes (the pretrains
# take 2, 7 and 15 minutes), eq3-vs-tune-lr about 25 minutes (one pretrain, 7 minutes);
# steps already stored are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/eq3-sweep.sh EXPERIMENT DATA_DIR [STORE] [OUT]"
EXP=${1:?$usage}
DATA=${2:?$usage}
STORE=${3:-artifacts}
SPEC=experiments/$EXP/spec.yaml
SCALES_FILE=experiments/$EXP/scales.yaml
if [ ! -f "$SPEC" ] || [ ! -f "$SCALES_FILE" ]; then
  echo "error: experiments/$EXP/ needs spec.yaml and scales.yaml (try eq3-vs-checkpoint, eq3-vs-tune-lr, default-tune-lr or default-tune-epochs)" >&2
  exit 2
fi
# The spec's dataset and the cell of its first figure panel name the outputs.
DSET=$(grep -m1 -oE 'dataset: \[[A-Za-z0-9_-]+' "$SPEC" | sed 's/.*\[//' || true)
PANEL=$(grep -m1 -oE '\{ dataset: [A-Za-z0-9_-]+, attack: [A-Za-z0-9_+-]+' "$SPEC" | sed -E 's/.*dataset: ([^,]+), attack: (.*)/\1-\2/' || true)
if [ -z "$DSET" ] || [ -z "$PANEL" ]; then
  echo "error: $SPEC needs a grid line \`dataset: [NAME, ...]\` and a figure panel \`{ dataset: NAME, attack: NAME, ... }\` (see experiments/eq3-vs-tune-lr/spec.yaml)" >&2
  exit 2
fi
OUT=${4:-reports/$EXP-$DSET-cpu.md}
SCALES=${SCALES:-$(grep -E '^[A-Za-z0-9_-]+:' "$SCALES_FILE" | cut -d: -f1 | tr '\n' ' ')}
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
    cp "$tmp/fig-$s/eq3-trace.$ext" "$(dirname "$OUT")/figures/eq3-trace-$PANEL-$s.$ext"
  done
done

COMMIT=${IEU_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 - "$OUT" "$tmp" "$COMMIT" "$EXP" "$SCALES_FILE" "$DSET" $SCALES <<'EOF'
import csv, re, sys
from collections import defaultdict
out, tmp, commit, exp, scales_file, dset, scales = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:]
dset_name = {"cifar10": "CIFAR-10", "synthetic": "the synthetic default"}.get(dset, dset)

# What each scale sets: its description, its pretraining epochs and f_r's finetuning rate.
text, settings, name = open(scales_file).read(), {}, None
for line in text.splitlines():
    m = re.match(r"^([A-Za-z0-9_-]+):\s*$", line)
    if m:
        name = m.group(1)
        settings[name] = {}
        continue
    if name is None:
        continue
    for key, pat in [("description", r'^\s+description:\s*"([^"]*)"'),
                     ("pretrain_epochs", r"^\s+pretrain:\s*\{[^}]*\bepochs:\s*([0-9]+)"),
                     ("tune_lr", r"^\s+finetune:\s*\{[^}]*\blr:\s*([0-9.eE+-]+)")]:
        m = re.match(pat, line)
        if m:
            settings[name][key] = m.group(1)
    # A dataset's own pretraining epochs (`epochs_per_dataset: { cifar10: 30 }`) win.
    m = re.match(r"^\s+pretrain:.*\bepochs_per_dataset:\s*\{([^}]*)\}", line)
    if m:
        per = dict(kv.split(":") for kv in m.group(1).replace(" ", "").split(",") if kv)
        if dset in per:
            settings[name]["pretrain_epochs"] = per[dset]

def f(v, nd=2):
    return "–" if v in ("", None) else f"{float(v):.{nd}f}"
rows = []
for s in scales:
    by_attack = defaultdict(dict)
    for r in csv.DictReader(open(f"{tmp}/{s}.csv")):
        by_attack[r["attack"]][r["defence"]] = r
    st = settings.get(s, {})
    for attack, cells in by_attack.items():
        if "none" not in cells or "ieu" not in cells:
            continue
        n, i = cells["none"], cells["ieu"]
        cost = float(n["ca"]) - float(i["ca"])
        rows.append(f"| `{s}` | {st.get('pretrain_epochs', '?')} | {float(st.get('tune_lr', 'nan')):.0e} "
                    f"| {attack} | {f(n['pretrain_accuracy'])} | {f(n['pretrain_confidence'])} "
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
scale_list = "\n".join(f"- `{s}`: {settings.get(s, {}).get('description', '')}" for s in scales)
with open(out, "w") as fh:
    fh.write(f"""# IEU's CA cost and Eq. 3 across `{exp}` ({dset_name}, cpu scale)

Written by `scripts/eq3-sweep.sh {exp}` (ieu-bench at commit {commit}). The scales differ
only where `experiments/{exp}/scales.yaml` says; everything else is the cpu scale's
(f_r finetuned for 8 epochs on 10 000 images poisoned at rate 0.1; c_thresh 0.95, a
one-block f_p, logit masking; the rest as `experiments/{exp}/spec.yaml` says). CA and ASR
on the whole test split.

{scale_list}

*confidence*: mean max-softmax probability of the checkpoint on the clean test split.
*Eq. 3 factor*: mean of lr_ul / lr_tune = max(6 − e^(ℓ/√2)/N_c, 0.2) over IEU's unlearning
steps; *unlearn loss*: mean cross-entropy ℓ of the unlearned batches against their
(poisoned) labels. With N_c = 10 the factor reaches its floor only when ℓ ≥ √2·ln(58) ≈ 5.74.

| scale | pretrain epochs | finetune lr | attack | accuracy % | confidence % | none CA | none ASR | IEU CA | IEU ASR | CA cost | gate: poison % | gate: clean % | unlearn steps | Eq. 3 factor | unlearn loss |
|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
""" + "\n".join(rows) + """

Eq. 3 over stage 2 on the first figure panel's cell, per epoch (from the per-step traces in
`figures/`; the first unlearned batch of every epoch has k = 0 and factor 1):

| scale | epoch | unlearned batches | mean factor | factor range | mean loss | loss range | at the 0.2 floor |
|---|---:|---:|---:|---|---:|---|---:|
""" + "\n".join(epochs) + "\n")
print(open(out).read())
EOF
