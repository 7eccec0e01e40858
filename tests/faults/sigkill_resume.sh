#!/usr/bin/env bash
# `moe train` killed with SIGKILL at ten moments spread over a run (mid-step and mid-checkpoint
# alike) leaves a checkpoint that loads and resumes bit-identically: the resumed run's losses
# equal, bit for bit, those of a run that was never interrupted.
#   bash sigkill_resume.sh MOE WORK [TRIALS]
set -euo pipefail
moe=$1
work=$2
trials=${3:-10}
rm -rf "$work"
mkdir -p "$work"
common=(--preset tiny --batch 4 --seq-len 32 --steps 60 --save-every 3 --eval-every 100000
        --warmup 5 --sample 0 --seed 3 -t 2)
"$moe" train "${common[@]}" --out "$work/ref" --log "$work/ref.jsonl" >/dev/null 2>&1
# When the first checkpoint appears and how long the whole run takes here (both differ between
# builds and machines), to spread the kills over the part of the run that writes checkpoints.
start=$(date +%s%N)
"$moe" train "${common[@]}" --out "$work/timing" >/dev/null 2>&1 &
pid=$!
first_ms=
while kill -0 "$pid" 2>/dev/null; do
  if [[ -z $first_ms && -f $work/timing/latest ]]; then
    first_ms=$(( ($(date +%s%N) - start) / 1000000 ))
  fi
  sleep 0.005
done
wait "$pid"
total_ms=$(( ($(date +%s%N) - start) / 1000000 ))
first_ms=${first_ms:-0}
echo "an uninterrupted run takes ${total_ms} ms, its first checkpoint appears at ${first_ms} ms"
span_ms=$(( total_ms - first_ms ))

resumed=0
for i in $(seq 1 "$trials"); do
  out=$work/t$i
  # the i-th kill lands at (i - 0.5) / trials of the checkpointing part, plus up to 10% of jitter
  delay_ms=$(( first_ms + span_ms * (2 * i - 1) / (2 * trials) + RANDOM % (span_ms / 10 + 1) ))
  "$moe" train "${common[@]}" --out "$out" >/dev/null 2>&1 &
  pid=$!
  sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [[ ! -f $out/latest ]]; then
    echo "trial $i: killed at ${delay_ms} ms, before the first checkpoint"
    continue
  fi
  step=$(cat "$out/latest")
  # It loads (its files' CRC-32s checked), and it resumes to the end.
  "$moe" eval -m "$out" --max-windows 2 --seq-len 32 -t 2 >/dev/null
  if [[ $step == step-000060 ]]; then  # killed after the last checkpoint: nothing to resume
    cmp "$out/$step/model.safetensors" "$work/ref/$step/model.safetensors"
    echo "trial $i: killed after the last checkpoint, which is the uninterrupted run's, bit for bit"
    resumed=$((resumed + 1))
    continue
  fi
  "$moe" train "${common[@]}" --out "$out" --resume "$out" --log "$out.jsonl" >/dev/null 2>&1
  python3 - "$work/ref.jsonl" "$out.jsonl" "$i" "$step" <<'PY'
import json, sys
ref = {j["step"]: j["loss"] for j in map(json.loads, open(sys.argv[1])) if "loss" in j and "step" in j}
got = [j for j in map(json.loads, open(sys.argv[2])) if "loss" in j and "step" in j]
assert got, "the resumed run logged no step"
for j in got:
    if ref[j["step"]] != j["loss"]:
        sys.exit(f"trial {sys.argv[3]}: step {j['step']}: loss {j['loss']!r} after resuming, "
                 f"{ref[j['step']]!r} without interruption")
print(f"trial {sys.argv[3]}: resumed from {sys.argv[4]}, steps {got[0]['step']}-{got[-1]['step']} "
      "bit-identical")
PY
  resumed=$((resumed + 1))
done
echo "$resumed of $trials killed runs left a checkpoint that resumed (or ended) bit-identically"
# Most kills must land after a checkpoint, or the test proves little.
[[ $resumed -ge $((trials / 2)) ]]
