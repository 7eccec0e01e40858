#!/usr/bin/env bash
# A checkpoint write that fails because the disk is full (a 7 MB tmpfs; where mounting is not
# allowed, a file-size limit that makes the same write fail) ends `moe train` with a clear
# error, and leaves the previous checkpoint whole: `latest` names it, it loads and resumes.
#   bash disk_full.sh MOE WORK
set -euo pipefail
moe=$1
work=$2
rm -rf "$work"
mkdir -p "$work/disk"
common=(--preset tiny --batch 4 --seq-len 32 --eval-every 100000 --warmup 2 --sample 0 --seed 3 -t 2)
mode=tmpfs
# (MOE_DISK_FULL_MODE=ulimit takes the second way where mounting works too.)
if [[ ${MOE_DISK_FULL_MODE:-} == ulimit ]] || ! mount -t tmpfs -o size=7m tmpfs "$work/disk" 2>/dev/null; then
  mode=ulimit
fi
cleanup() { [[ $mode == tmpfs ]] && umount "$work/disk" 2>/dev/null || true; }
trap cleanup EXIT
out=$work/disk/run
# A tiny checkpoint is 5.2 MB (model 1.0, optimizer 4.1): the first fits, the second does not.
"$moe" train "${common[@]}" --steps 4 --save-every 4 --out "$out" >/dev/null 2>&1
[[ $(cat "$out/latest") == step-000004 ]]
set +e
if [[ $mode == tmpfs ]]; then
  msg=$("$moe" train "${common[@]}" --steps 8 --save-every 4 --out "$out" --resume "$out" 2>&1)
  rc=$?
else
  # No files over 2 MB: the optimizer state cannot be written. SIGXFSZ ignored: write() fails.
  msg=$(trap '' XFSZ; ulimit -f 2048; "$moe" train "${common[@]}" --steps 8 --save-every 4 \
          --out "$out" --resume "$out" 2>&1)
  rc=$?
fi
set -e
echo "($mode) exit $rc: $(echo "$msg" | grep error)"
[[ $rc -eq 2 ]]
echo "$msg" | grep -q "cannot save step 8 in $out"
echo "$msg" | grep -q "the checkpoint before it is unchanged"
if [[ $mode == tmpfs ]]; then echo "$msg" | grep -q "No space left on device"; fi
# The previous checkpoint: named by latest, whole (CRC-32s), loads, resumes elsewhere.
[[ $(cat "$out/latest") == step-000004 ]]
[[ ! -e $out/step-000008 ]]
ls -A "$out" | grep -q '\.tmp$' && { echo "a temporary folder was left behind"; exit 1; }
"$moe" eval -m "$out" --max-windows 2 --seq-len 32 -t 2 >/dev/null
"$moe" train "${common[@]}" --steps 8 --save-every 4 --out "$work/elsewhere" --resume "$out" \
  >/dev/null 2>&1
[[ $(cat "$work/elsewhere/latest") == step-000008 ]]
echo "the previous checkpoint stayed whole, loaded and resumed"
