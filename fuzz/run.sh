#!/usr/bin/env bash
# Runs the libFuzzer targets of a `fuzz` build, each for SECONDS, from the seeds in fuzz/seeds and
# the test fixtures, keeping what each finds in BUILD/fuzz_corpus/<target> for the next run.
# Prints each target's executions and coverage; fails when a target finds a crash (the input
# goes to BUILD/fuzz_artifacts/).
#
#   bash fuzz/run.sh BUILD SECONDS [TARGET...]      (default: every target, one after another)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fixtures=$here/../tests/fixtures
build=${1:?usage: fuzz/run.sh BUILD SECONDS [TARGET...]}
seconds=${2:?usage: fuzz/run.sh BUILD SECONDS [TARGET...]}
shift 2
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(fuzz_safetensors fuzz_gguf fuzz_config fuzz_tokenizer_json fuzz_tokenize fuzz_cli
                                  fuzz_chat_template)
mkdir -p "$build/fuzz_artifacts"

status=0
for t in "${targets[@]}"; do
  bin=$build/fuzz/$t
  [[ -x $bin ]] || { echo "$bin: not built (cmake --preset fuzz && cmake --build --preset fuzz)"; exit 2; }
  corpus=$build/fuzz_corpus/$t
  mkdir -p "$corpus"
  seeds=("$here/seeds/$t")
  max_len=4096
  case $t in
    fuzz_safetensors)
      max_len=1100000
      for d in "$fixtures"/hf/*/ "$fixtures/trained_tiny/"; do seeds+=("$d"); done ;;
    fuzz_gguf)
      max_len=65536 ;;  # the fixtures' GGUF files (3-6 MB) are too large to mutate usefully
    fuzz_config)
      for d in "$fixtures"/hf/*/ "$fixtures/trained_tiny/"; do seeds+=("$d"); done ;;
    fuzz_tokenizer_json)
      max_len=300000
      for d in "$fixtures"/tokenizers/*_bpe/; do [[ -f $d/tokenizer.json ]] && seeds+=("$d"); done ;;
  esac
  # libFuzzer reads every folder given, writes new inputs to the first. Seed folders hold other
  # files too (safetensors beside config.json): they are inputs like any other.
  log=$build/fuzz_artifacts/$t.log
  set +e
  "$bin" -max_total_time="$seconds" -max_len="$max_len" -timeout=20 -rss_limit_mb=4096 \
    -print_final_stats=1 -artifact_prefix="$build/fuzz_artifacts/$t-" "$corpus" "${seeds[@]}" \
    >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -m1 -oP 'stat::number_of_executed_units: \K\d+' "$log" || echo "?")
  cov=$(grep -oP '#\d+\s+(DONE|pulse|NEW|REDUCE|INITED)\s+cov: \K\d+' "$log" | tail -1 || true)
  ft=$(grep -oP 'ft: \K\d+' "$log" | tail -1 || true)
  corpus_n=$(ls "$corpus" | wc -l)
  if [[ $rc -eq 0 ]]; then
    echo "$t: ${seconds} s, $execs executions, coverage $cov edges ($ft features), corpus $corpus_n inputs, no finding"
  else
    echo "$t: FINDING (exit $rc) after $execs executions; the input is in $build/fuzz_artifacts; log:"
    grep -A30 -m1 "ERROR\|==ERROR\|runtime error\|deadly signal\|uncaught exception" "$log" | head -40
    status=1
  fi
done
exit $status
