#!/usr/bin/env bash
# Every GPU figure docs/performance.md owes, measured and written in one command:
#
#   bash scripts/gpu-bench.sh                 # all parts
#   bash scripts/gpu-bench.sh default         # the default path, under 8 minutes (below)
#   bash scripts/gpu-bench.sh step slots      # some parts: default impls step compile slots
#                                             #   data cifar10 pack fused step-graph lambda
#                                             #   imagenette multi-gpu decode224
#
# Each part writes OUT/<part>.txt (the printed table) and OUT/<part>.json (rows + device,
# torch version, UTC date); OUT/index.md gathers them with the commands that made them.
# OUT defaults to docs/bench/<gpu name>; set LAMBDAPIPE_BENCH_OUT to change it.
# LAMBDAPIPE_BENCH_DEVICE (default cuda) and LAMBDAPIPE_CMD (default `python -m lambdapipe`:
# this checkout's package) exist for the script's own test on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(default impls step compile slots data cifar10 pack fused step-graph lambda imagenette multi-gpu decode224)
device=${LAMBDAPIPE_BENCH_DEVICE:-cuda}
lp=${LAMBDAPIPE_CMD:-python -m lambdapipe}
if [ "$device" = cuda ]; then
    gpu=$(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')
    if [ -z "$gpu" ]; then
        echo "gpu-bench: no CUDA device visible; these figures are GPU figures" >&2
        exit 2
    fi
else
    gpu=$device
fi
out=${LAMBDAPIPE_BENCH_OUT:-docs/bench/$(echo "$gpu" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')}
mkdir -p "$out"

models=resnet18,resnet20x1,lr18_l3_lc,lr18_l3_rpe,lr18_l2_lc,lr18_l2_rpe
measure() {  # measure PART ARGS...: one `lambdapipe bench` call, its table and its JSON
    local part=$1; shift
    echo "lambdapipe bench $* --device $device --out $out/$part.json" > "$out/$part.cmd"
    echo "== $part: $(cat "$out/$part.cmd")" >&2
    # each row is printed (and saved) as it is measured: a time limit loses only the rest
    PYTHONUNBUFFERED=1 $lp bench "$@" --device "$device" --out "$out/$part.json" \
        | tee "$out/$part.txt"
}

for part in "${parts[@]}"; do
    case $part in
        default)  # what training runs when nobody asks: compile auto (CUDA graphs),
                  # channels_last, each lambda layer's impl measured; then the CIFAR-10 table
            measure default --models "$models,lr34_l3_lc" --batch-size 256 --precision bf16
            measure cifar10-default --config config/resnet_baselines.yaml --datasets cifar10 \
                --seeds 0 ;;
        impls)  # every lambda layer's implementations timed: the check of the fixed rule
                # `auto` follows on CUDA (a GEMM order, never conv; docs/performance.md)
            measure impls --models lr18_l3_lc,lr18_l3_rpe,lr18_l2_lc,lr18_l2_rpe,lr34_l3_lc \
                --batch-size 256 --precision bf16 --impls ;;
        step) measure step --models "$models,resnet34,lr34_l3_lc,lr34_l3_rpe,lr34_l2_lc" \
                  --batch-size 256 \
                  --precision bf16 ;;
        compile)
            measure compile --models "$models" --batch-size 256 --precision bf16 \
                --compile default
            measure graphs --models "$models" --batch-size 256 --precision bf16 \
                --compile reduce-overhead ;;
        slots) measure slots2 --models resnet20x1,resnet18 --batch-size 256 \
                   --precision bf16 --slots 2 ;;
        data)  # the prepared-dataset path against synthetic tensors (digits: offline)
            $lp prepare --dataset digits > /dev/null
            measure data-synthetic --models resnet18 --dataset digits --batch-size 256 \
                --precision bf16 --steps 200
            measure data-real --models resnet18 --dataset digits --real-data \
                --batch-size 256 --precision bf16 --steps 200 ;;
        cifar10)
            measure cifar10-baselines --config config/resnet_baselines.yaml \
                --datasets cifar10 --seeds 0 --slots 1,2
            measure cifar10-baselines-graphs --config config/resnet_baselines.yaml \
                --datasets cifar10 --seeds 0 --slots 1,2 --compile reduce-overhead ;;
        pack)  # a cell's seeds in one process (`train --seeds`), compiled default path
            measure pack4 --models resnet20x1,resnet18 --batch-size 256 --precision bf16 \
                --pack 4 --compile reduce-overhead
            measure cifar10-baselines-packed --config config/resnet_baselines.yaml \
                --datasets cifar10 --pack 3 --compile reduce-overhead ;;
        step-graph)  # the whole step as one CUDA graph (`compile: step-graph`), against
                     # the default path's per-region graphs; alone, fused, the CIFAR-10 table
            measure step-graph --models resnet20x1,resnet18,lr18_l3_lc,lr18_l2_lc \
                --batch-size 256 --precision bf16 --compile step-graph
            measure fused4-step-graph --models resnet20x1,resnet18 --batch-size 256 \
                --precision bf16 --pack 4 --fuse --compile step-graph
            measure cifar10-step-graph --config config/resnet_baselines.yaml \
                --datasets cifar10 --seeds 0 --compile step-graph ;;
        fused)  # a cell's seeds as one network (`train --seeds --fuse`), default path;
                # the CIFAR-10 table with 3 seeds a cell so (issue 15: under 30 min)
            measure fused4 --models resnet20x1,resnet18,lr18_l3_lc --batch-size 256 \
                --precision bf16 --pack 4 --fuse
            measure cifar10-baselines-fused --config config/resnet_baselines.yaml \
                --datasets cifar10 --pack 3 --fuse ;;
        lambda) measure lambda-cifar10 --config config/lambda_cifar10.yaml --seeds 0 ;;
        imagenette) measure imagenette-noisy --config config/imagenette_noisy.yaml \
                        --seeds 0 ;;
        multi-gpu)  # one run on all N GPUs of this node (torchrun, DDP) against one GPU, the
                    # same per-GPU batch (docs/distributed.md); then `bench --config` of two
                    # ImageNet tables on W GPUs; skipped with fewer than 2 GPUs
            n=0
            [ "$device" != cuda ] || n=$(python -c 'import torch; print(torch.cuda.device_count())')
            if [ "$n" -lt 2 ]; then
                echo "gpu-bench: multi-gpu skipped: $n CUDA GPUs here, it needs 2 or more" >&2
                continue
            fi
            $lp prepare --dataset digits > /dev/null
            runs=$out/multi-gpu-runs
            rm -rf "$runs"
            for k in 1 "$n"; do
                cmd="python -m torch.distributed.run --standalone --nproc-per-node $k -m lambdapipe.cli train --model resnet18 --dataset digits --recipe demo --device cuda --no-progress --set batch_size=$((128 * k)) --set iterations=300 --set eval_every=100 --set precision=bf16 --out $runs/$k"
                echo "== multi-gpu: $cmd" >&2
                $cmd > /dev/null
                echo "$cmd" >> "$runs/cmds"
            done
            python - "$out" "$n" "$gpu" <<'EOF_MULTI'
"""multi-gpu.{txt,json,cmd}: images/s of the last 100 steps, 1 GPU against N (weak scaling)."""
import csv, datetime, json, sys
from pathlib import Path
import torch
out, n = Path(sys.argv[1]), int(sys.argv[2])
speed = {k: float(list(csv.DictReader(open(out / "multi-gpu-runs" / str(k) / "metrics.csv")))[-1]["images_per_s"]) for k in (1, n)}
rows = [{"device_name": sys.argv[3], "gpus": k, "batch_size": 128 * k,
         "images_per_s": speed[k], "efficiency": speed[k] / (k * speed[1])} for k in (1, n)]
text = "gpus  global batch  images/s  efficiency (images/s / (gpus x 1-GPU images/s))\n" + "".join(
    f"{r['gpus']:>4}  {r['batch_size']:>12}  {r['images_per_s']:>8.0f}  {r['efficiency']:>10.2f}\n" for r in rows)
print(text, end="")
(out / "multi-gpu.txt").write_text(text)
(out / "multi-gpu.cmd").write_text((out / "multi-gpu-runs" / "cmds").read_text().replace("\n", "; ").rstrip("; "))
(out / "multi-gpu.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}))
EOF_MULTI
            # each ImageNet table's runs on W = the largest power of two <= N GPUs (W divides
            # the recipes' global batches): `bench --config` times the W-rank DDP step itself
            # where this node holds W GPUs, and projects the table's wall time from it
            w=1
            while [ $((w * 2)) -le "$n" ]; do w=$((w * 2)); done
            printf 'train: {gpus: %d, device: cuda}\n' "$w" > "$out/multi-gpu-ranks.yaml"
            for table in imagenet32 imagenet2012; do
                measure "multi-gpu-$table" --config "config/$table.yaml" \
                    --config "$out/multi-gpu-ranks.yaml" --seeds 0 --gpus "$w"
            done ;;
        decode224)  # ImageNet at 224 px: images/s the stream decodes and crops, on the CPU
                    # workers and with nvJPEG, beside a step's (docs/imagenet.md)
            echo "python scripts/decode-bench.py $out $device" > "$out/decode224.cmd"
            echo "== decode224: $(cat "$out/decode224.cmd")" >&2
            PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" python scripts/decode-bench.py "$out" \
                "$device" ;;  # this checkout's package, as `python -m lambdapipe` takes it
        *) echo "gpu-bench: unknown part '$part': expected default impls step compile slots" \
                "data cifar10 pack fused step-graph lambda imagenette multi-gpu decode224" >&2
           exit 2 ;;
    esac
done

python - "$out" <<'EOF'
"""OUT/index.md: every part measured so far, with its command, device, torch and date."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
lines = ["# GPU measurements", "",
         "Written by `bash scripts/gpu-bench.sh` (docs/performance.md says what each figure "
         "means). Rerun it to regenerate this page.", ""]
for path in sorted(out.glob("*.json")):
    saved = json.loads(path.read_text())
    rows = saved.get("rows") or [{}]
    lines += [f"## {path.stem}", "",
              f"`{(out / (path.stem + '.cmd')).read_text().strip()}`", "",
              f"{rows[0].get('device_name', '?')}, torch {saved['torch']}, {saved['date']}", "",
              "```", (out / (path.stem + ".txt")).read_text().rstrip(), "```", ""]
tmp = out / "index.md.tmp"
tmp.write_text("\n".join(lines))
tmp.replace(out / "index.md")
print(f"wrote {out / 'index.md'}")
EOF
