// Byte-level BPE tokenizer read from GGUF metadata (tokenizer.ggml.*), matching Hugging Face
// `tokenizers` for the gpt2-style pre-tokenizers llama.cpp names `smollm`, `qwen2`, `gpt2`
// and `llama-bpe`.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace x2l {

class GGUFFile;

class Tokenizer {
  public:
    // Throws FormatError when the vocabulary is missing or is not a supported BPE kind/pre-type.
    static std::unique_ptr<Tokenizer> from_gguf(const GGUFFile& f);
    virtual ~Tokenizer() = default;

    // parse_special: text spans equal to control/user-defined tokens map to those ids.
    // add_bos: prepend BOS when the model asks for it (tokenizer.ggml.add_bos_token).
    virtual std::vector<int32_t> encode(const std::string& text, bool parse_special, bool add_bos) const = 0;
    // Concatenated bytes of the tokens (byte-level decoding); skip_special drops control tokens.
    virtual std::string decode(const std::vector<int32_t>& ids, bool skip_special) const = 0;
    // Raw bytes of one token (may be a partial UTF-8 sequence).
    virtual std::string token_bytes(int32_t id) const = 0;
    virtual const std::string& token_text(int32_t id) const = 0;  // vocabulary string as stored
    virtual bool is_control(int32_t id) const = 0;
    virtual int32_t n_vocab() const = 0;
    virtual int32_t find_token(const std::string& text) const = 0;  // -1 when absent

    int32_t bos_id = -1, eos_id = -1, eot_id = -1, pad_id = -1;
    bool add_bos = false;
    std::string pre_type;
};

}  // namespace x2l
