// SentencePiece model files (tokenizer.model, a serialized sentencepiece ModelProto) through
// libsentencepiece: its own normalization, segmentation and byte fallback, unchanged.
#include <sentencepiece_processor.h>

#include "moe/error.h"
#include "tok/tok.h"

namespace moe::tok {

namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& path) {
    const auto status = sp_.Load(path);
    MOE_CHECK(status.ok(), "tokenizer", "{}: not a SentencePiece model file: {}", path,
              status.ToString());
    n_pieces_ = sp_.GetPieceSize();
    MOE_CHECK(n_pieces_ > 0, "tokenizer", "{}: the SentencePiece model has no pieces", path);
  }

  // Text as written: SentencePiece matches its user-defined symbols in the text, but never its
  // control symbols (<s>, </s>).
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int> ids;
    const auto status = sp_.Encode(text, &ids);
    MOE_CHECK(status.ok(), "tokenizer", "SentencePiece could not encode the text: {}",
              status.ToString());
    return {ids.begin(), ids.end()};
  }

  // SentencePiece's decoding: control symbols (<s>, </s>) decode to nothing, as in
  // sentencepiece's own DecodeIds.
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::vector<int> sp_ids;
    sp_ids.reserve(ids.size());
    for (int32_t id : ids) {
      MOE_CHECK(id >= 0 && id < n_pieces_, "tokenizer",
                "id {} is outside the SentencePiece vocabulary of {}", id, n_pieces_);
      sp_ids.push_back(id);
    }
    std::string text;
    const auto status = sp_.Decode(sp_ids, &text);
    MOE_CHECK(status.ok(), "tokenizer", "SentencePiece could not decode the ids: {}",
              status.ToString());
    return text;
  }

  int64_t vocab_size() const override { return n_pieces_; }
  std::optional<int32_t> bos_id() const override { return known(sp_.bos_id()); }
  std::optional<int32_t> eos_id() const override { return known(sp_.eos_id()); }

 private:
  // SentencePiece says -1 for a special token the model does not have.
  std::optional<int32_t> known(int id) const {
    if (id < 0 || id >= n_pieces_) return std::nullopt;
    return id;
  }

  sentencepiece::SentencePieceProcessor sp_;
  int n_pieces_ = 0;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path) {
  return std::make_unique<SentencePieceTokenizer>(path);
}

}  // namespace moe::tok
