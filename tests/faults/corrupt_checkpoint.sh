#!/usr/bin/env bash
# A truncated or corrupted checkpoint gives a clear error naming the damaged file (exit status
# 2), whichever file it is and whichever command reads it.
#   bash corrupt_checkpoint.sh MOE WORK
set -euo pipefail
moe=$1
work=$2
rm -rf "$work"
mkdir -p "$work"
common=(--preset tiny --batch 4 --seq-len 32 --eval-every 100000 --warmup 2 --sample 0 --seed 3 -t 2)
"$moe" train "${common[@]}" --steps 2 --save-every 2 --out "$work/good" >/dev/null 2>&1
good=$work/good/step-000002
failures=0
# expect NAME FILE NEEDLE COMMAND...: COMMAND must exit 2 with an error naming FILE and NEEDLE.
expect() {
  local name=$1 file=$2 needle=$3
  shift 3
  set +e
  local msg
  msg=$("$@" 2>&1 >/dev/null)
  local rc=$?
  set -e
  if [[ $rc -eq 2 && $msg == *"$file"* && $msg == *"$needle"* ]]; then
    echo "ok   $name: $(echo "$msg" | grep -m1 error)"
  else
    echo "FAIL $name (exit $rc): $msg"
    failures=$((failures + 1))
  fi
}
# fresh copy of the good checkpoint in $work/$1
copy() { rm -rf "$work/$1"; cp -r "$good" "$work/$1"; echo "$work/$1"; }
flip() {  # flips one byte of $1 at offset $2
  python3 -c "import sys; p, o = sys.argv[1], int(sys.argv[2]); b = bytearray(open(p, 'rb').read()); b[o] ^= 0x55; open(p, 'wb').write(b)" "$1" "$2"
}
resume() { "$moe" train "${common[@]}" --steps 4 --out "$work/resumed" --resume "$1"; }
generate() { "$moe" generate -m "$1" --prompt-ids 1,2,3 -n 2 -t 2; }

d=$(copy truncated_model); truncate -s -100 "$d/model.safetensors"
expect "truncated model, generate" "$d/model.safetensors" "truncated" generate "$d"
d=$(copy truncated_opt); truncate -s 1000 "$d/optimizer.safetensors"
expect "truncated optimizer, resume" "$d/optimizer.safetensors" "truncated" resume "$d"
d=$(copy flipped_model); flip "$d/model.safetensors" 600000
expect "one byte of the weights changed, generate" "$d/model.safetensors" "corrupted" generate "$d"
expect "one byte of the weights changed, resume" "$d/model.safetensors" "corrupted" resume "$d"
d=$(copy flipped_opt); flip "$d/optimizer.safetensors" 3000000
expect "one byte of the optimizer changed, resume" "$d/optimizer.safetensors" "corrupted" resume "$d"
d=$(copy header); flip "$d/model.safetensors" 20
expect "a header byte changed, eval" "$d/model.safetensors" "corrupted" "$moe" eval -m "$d" -t 2
d=$(copy state); echo '{"step": 2, "files": ' > "$d/trainer_state.json"
expect "trainer_state.json cut short, resume" "$d/trainer_state.json" "" resume "$d"
d=$(copy config); truncate -s 50 "$d/config.json"
expect "config.json cut short, generate" "$d/config.json" "" generate "$d"
d=$(copy missing); rm "$d/optimizer.safetensors"
expect "optimizer file missing, resume" "$d/optimizer.safetensors" "missing" resume "$d"
# Without the training record (HuggingFace-style folders), the reader's own checks name the file.
d=$(copy no_record); rm "$d/trainer_state.json"; truncate -s -100 "$d/model.safetensors"
expect "truncated model without a record, generate" "$d/model.safetensors" "outside the data" generate "$d"
[[ $failures -eq 0 ]]
