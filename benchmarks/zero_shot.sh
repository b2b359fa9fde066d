#!/usr/bin/env bash
# Zero-shot accuracy of the built-in backbone through `fedlrm run algorithm=zeroshot`, the global test
# being the whole test split: CIFAR-10, Caltech101 (100 classes), and the Caltech101 classes held out of
# pretraining among themselves. The figures must equal the recipe's (PRETRAIN.json, zero_shot).
#   bash benchmarks/zero_shot.sh [DATASETS_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
D=$(realpath "${1:-../shared/datasets}")
OUT=${2:-/tmp/fedlrm-zero-shot}
common=(algorithm=zeroshot data.source=parquet data.global_test_size=null data.test_per_client=null
        output_dir="$OUT" train.rounds=1)
fedlrm run --no-progress "${common[@]}" data.train="$D/cifar10-train.parquet" data.test="$D/cifar10-test.parquet" name=cifar10
fedlrm run --no-progress "${common[@]}" data.train="$D/caltech101-train.parquet" data.test="$D/caltech101-test.parquet" \
    "data.exclude_classes=[BACKGROUND_Google,Faces_easy]" name=caltech101
others=$(python - "$D" <<'PY'
import json, sys
import pyarrow.parquet as pq
from fedlrm.models.builtin import ASSET_DIR
held = set(json.loads((ASSET_DIR / "PRETRAIN.json").read_text())["held_out_classes"]["names"])
names = json.loads(pq.read_schema(f"{sys.argv[1]}/caltech101-train.parquet").metadata[b"huggingface"])
print(",".join(n for n in names["info"]["features"]["label"]["names"] if n not in held))
PY
)
fedlrm run --no-progress "${common[@]}" data.num_clients=2 data.train="$D/caltech101-train.parquet" \
    data.test="$D/caltech101-test.parquet" "data.exclude_classes=[$others]" name=held-out
for name in cifar10 caltech101 held-out; do
    python -c "import json, sys; s = json.load(open(sys.argv[1])); print(f'{sys.argv[2]}: global (whole test split) {100 * s[\"global_accuracy\"]:.2f} %')" \
        "$OUT/$name/summary.json" "$name"
done
