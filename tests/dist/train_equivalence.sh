#!/usr/bin/env bash
# `moe train --expert-parallel` under mpirun against one process (ctest: dist_train):
#  1. 2 and 4 ranks (EP=2, EP=4, EP=2 x DP=2) give the routing of one process at every step
#     (each expert's token count per layer, exactly) and its losses within a float32
#     reduction-order tolerance (relative 1e-6);
#  2. the same with the balancing options (router warm-up, global-batch and device-level
#     balancing) on 2 ranks;
#  3. a checkpoint saved with EP=2 resumes with EP=1 and with EP=4 on the same trajectory;
#  4. the checkpoints a distributed run writes (streamed, each routed tensor gathered in turn)
#     are the one process's files: the same tensors in the same order, values within 1e-5, in
#     Mixtral's layout and (a model with an MTP module) this engine's.
# usage: train_equivalence.sh MOE_BINARY WORK_DIR
set -euo pipefail
moe=$1
work=$2
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
rm -rf "$work" && mkdir -p "$work" && cd "$work"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none MOE_DIST_TIMEOUT=120
args=(--preset tiny --data "$root/README.md" --batch 4 --seq-len 32 --steps 6 --eval-every 3
      --save-every 3 --sample 0 -t 1)
compare() {  # compare.py ONE OTHER [FIRST_STEP]
  /usr/bin/python3 "$here/compare_logs.py" "$@"
}
same_files() {  # compare_checkpoints.py ONE_DIR OTHER_DIR
  /usr/bin/python3 "$here/compare_checkpoints.py" "$@"
}

"$moe" train "${args[@]}" --out one --log one.jsonl > /dev/null
for run in "2 2" "4 4" "4 2"; do
  set -- $run
  name="np$1_ep$2"
  echo "== mpirun -np $1 moe train --expert-parallel $2"
  mpirun -np "$1" --oversubscribe "$moe" train "${args[@]}" --expert-parallel "$2" \
    --out "$name" --log "$name.jsonl" > /dev/null
  compare one.jsonl "$name.jsonl"
  same_files one/step-000003 "$name/step-000003"
done

# A model with a multi-token prediction module: this engine's own checkpoint layout.
"$moe" train "${args[@]}" --mtp 1 --out mtp_one --log mtp_one.jsonl > /dev/null
echo "== mpirun -np 2 moe train --expert-parallel 2 --mtp 1"
mpirun -np 2 --oversubscribe "$moe" train "${args[@]}" --mtp 1 --expert-parallel 2 \
  --out mtp_np2 --log mtp_np2.jsonl > /dev/null
compare mtp_one.jsonl mtp_np2.jsonl
same_files mtp_one/step-000006 mtp_np2/step-000006

# The balancing options: dense warm-up (the soft router), global-batch balancing over two
# accumulated micro-batches and the device-level loss over the 2 ranks, against one process.
bal=(--router-warmup 2 --global-balance --grad-accum 2 --device-aux-coef 0.05 --devices 2)
"$moe" train "${args[@]}" "${bal[@]}" --out bal_one --log bal_one.jsonl > /dev/null
echo "== mpirun -np 2 moe train --expert-parallel 2 ${bal[*]}"
mpirun -np 2 --oversubscribe "$moe" train "${args[@]}" "${bal[@]}" --expert-parallel 2 \
  --out bal_np2 --log bal_np2.jsonl > /dev/null
compare bal_one.jsonl bal_np2.jsonl

# Resharding: the EP=2 run's step-3 checkpoint, resumed with EP=1 and EP=4.
for ep in 1 4; do
  echo "== the EP=2 checkpoint of step 3 resumed with EP=$ep"
  mkdir "re$ep"
  cp -r np2_ep2/step-000003 "re$ep/"
  echo step-000003 > "re$ep/latest"
  if [[ $ep == 1 ]]; then
    "$moe" train "${args[@]}" --resume "re$ep" --out "re$ep" --log "re$ep.jsonl" > /dev/null
  else
    mpirun -np "$ep" --oversubscribe "$moe" train "${args[@]}" --expert-parallel "$ep" \
      --resume "re$ep" --out "re$ep" --log "re$ep.jsonl" > /dev/null
  fi
  compare one.jsonl "re$ep.jsonl" 4
done
echo "all runs match one process"
