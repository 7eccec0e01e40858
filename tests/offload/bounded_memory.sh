#!/usr/bin/env bash
# `moe generate --expert-cache-mb` on a model with 200 MB of routed experts and a 6 MB cache
# (ctest: offload_bounded_memory): every policy generates the tokens of the fully loaded model,
# and with CHECK_RSS=1 the process's peak resident memory stays under the cache plus 16 MB above
# that of the same generation by a dense model of the same width (the program, its libraries and
# the JIT kernels of the machine's path: 24-32 MB measured; the rest: the router, the experts'
# index, the expert reads in flight and the allocator's slack, 11-13 MB measured), while the fully
# loaded model's stays under 280 MB (the weights once, not also the file's pages).
# usage: bounded_memory.sh MOE_BINARY WORK_DIR CHECK_RSS
set -euo pipefail
moe=$1
work=$2
check_rss=$3
rm -rf "$work" && mkdir -p "$work" && cd "$work"
"$moe" init --preset small --experts 128 --seed 3 --out model -t 2
gen=(generate -m model --prompt-ids 1,72,101,108 -n 24 --temp 0 --ids -t 2)
"$moe" "${gen[@]}" > resident.ids 2> resident.err
peak_mb() { sed -n 's/^peak resident memory: \([0-9.]*\) MB$/\1/p' "$1"; }
# The process without experts: a dense model of the same width, the same generation.
"$moe" init --preset small-dense --seed 3 --out dense -t 2
"$moe" generate -m dense --prompt-ids 1,72,101,108 -n 24 --temp 0 --ids -t 2 > dense.ids 2> dense.err
base=$(peak_mb dense.err)
bound=$(awk -v b="$base" 'BEGIN { print b + 6 + 16 }')
echo "a dense model of the same width: peak resident memory $base MB; bound with the cache: $bound MB"
# Loading every expert holds the weights once: the file's pages are dropped as they are copied.
resident=$(peak_mb resident.err)
echo "every expert loaded: peak resident memory $resident MB (the weights: 203 MB)"
if [[ $check_rss == 1 ]] && ! awk -v p="$resident" 'BEGIN { exit !(p < 280) }'; then
  echo "FAIL: loading the model peaked at $resident MB, not under 280 MB"
  exit 1
fi
for policy in lru lfu routing; do
  "$moe" "${gen[@]}" --expert-cache-mb 6 --cache-policy "$policy" > "$policy.ids" 2> "$policy.err"
  if ! cmp -s resident.ids "$policy.ids"; then
    echo "FAIL $policy: the tokens differ from the fully loaded model's"
    cat resident.ids "$policy.ids"
    exit 1
  fi
  grep "expert cache" "$policy.err"
  if grep -q " 0 evictions" "$policy.err"; then
    echo "FAIL $policy: the cache never evicted, so it was never full"
    exit 1
  fi
  peak=$(peak_mb "$policy.err")
  echo "$policy: same tokens; peak resident memory $peak MB"
  if [[ $check_rss == 1 ]] && ! awk -v p="$peak" -v b="$bound" 'BEGIN { exit !(p < b) }'; then
    echo "FAIL $policy: peak resident memory $peak MB is not under $bound MB"
    exit 1
  fi
done
echo "every policy matches the fully loaded model"
