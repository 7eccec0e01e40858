#!/usr/bin/env bash
# A rank that dies or hangs in the middle of `mpirun -np 2 moe train` ends the whole job with a
# clear error within a bounded time (ctest: dist_rank_failure):
#  - kill: SIGKILL to one rank; mpirun stops the other, which says why;
#  - hang: SIGSTOP to one rank; the other waits MOE_DIST_TIMEOUT seconds in a collective, then
#    says which and ends the job.
# usage: rank_failure.sh MOE_BINARY WORK_DIR
set -uo pipefail
moe=$1
work=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
bound=30  # seconds from the fault to the end of the job

run_case() {  # run_case NAME SIGNAL EXPECTED_MESSAGE
  local name=$1 sig=$2 expect=$3
  mpirun -np 2 --oversubscribe "$moe" train --preset tiny --data "$root/README.md" --batch 2 \
    --seq-len 32 --steps 1000000 --eval-every 0 --save-every 0 --sample 0 -t 1 \
    --out "$name" --log "$name.jsonl" > "$name.out" 2> "$name.err" &
  local job=$!
  # Wait for a few steps.
  for _ in $(seq 600); do
    [[ -f $name.jsonl && $(wc -l < "$name.jsonl") -ge 3 ]] && break
    sleep 0.1
  done
  local ranks
  ranks=$(pgrep -P "$job" -f "moe train" | sort -n)
  local victim
  victim=$(echo "$ranks" | tail -1)
  if [[ -z $victim || $(echo "$ranks" | wc -l) -ne 2 ]]; then
    echo "FAIL $name: did not find the two ranks under mpirun (pid $job): '$ranks'"
    kill -9 "$job" 2> /dev/null
    return 1
  fi
  local t0=$SECONDS
  kill "-$sig" "$victim"
  local waited=0
  while kill -0 "$job" 2> /dev/null; do
    if (( SECONDS - t0 > bound )); then
      echo "FAIL $name: the job still runs ${bound}s after SIG$sig to rank pid $victim"
      kill -9 $ranks "$job" 2> /dev/null
      return 1
    fi
    sleep 0.2
  done
  wait "$job"
  local rc=$?
  waited=$(( SECONDS - t0 ))
  if [[ $rc -eq 0 ]]; then
    echo "FAIL $name: mpirun exited 0 after SIG$sig to a rank"
    return 1
  fi
  if ! grep -q "$expect" "$name.err"; then
    echo "FAIL $name: no '$expect' in the job's stderr:"
    cat "$name.err"
    return 1
  fi
  echo "ok $name: SIG$sig to one rank ended the job in ${waited}s (exit $rc):"
  grep -m1 "$expect" "$name.err"
}

fail=0
run_case kill KILL "stopped by mpirun: another rank of the job has ended" || fail=1
MOE_DIST_TIMEOUT=5 run_case hang STOP "one of them has died or hangs" || fail=1
exit $fail
