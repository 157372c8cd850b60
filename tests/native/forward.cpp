// A full forward of a GGUF model on the CPU backend, for tests/test_cross_isa.py: the same C++ core
// cross-compiled for another ISA (aarch64 under qemu) evaluates the token ids given on the command
// line and writes every position's logits, which the test compares with the host's.
//
//   forward MODEL.gguf KV_TYPE OUT.bin N_BATCH TOKEN...     (KV_TYPE: f32, f16, q8_0 or q4_0)
//
// The prompt is evaluated in N_BATCH-token pieces, then the last two tokens are evaluated again one by
// one after a truncate, so both the tiled prefill and the single-token (decode) kernels run.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "core/formats.h"
#include "llm/cpu_executor.h"
#include "llm/session.h"

int main(int argc, char** argv) {
    if (argc < 6) {
        std::fprintf(stderr, "usage: forward MODEL.gguf KV_TYPE OUT.bin N_BATCH TOKEN...\n");
        return 2;
    }
    try {
        x2l::SessionOptions opt;
        opt.n_threads = 2;
        opt.n_ctx = 512;
        opt.n_batch = std::atoi(argv[4]);
        const std::string kv = argv[2];
        opt.kv_type = kv == "f32" ? x2l::DType::F32 : kv == "q8_0" ? x2l::DType::Q8_0 : kv == "q4_0" ? x2l::DType::Q4_0
                                                                                          : x2l::DType::F16;
        std::vector<int32_t> ids;
        for (int i = 5; i < argc; ++i) ids.push_back(std::atoi(argv[i]));
        x2l::LlmSession s(argv[1], opt, [](const x2l::LlmModel& model, x2l::ThreadPool& pool,
                                            const x2l::SessionOptions& o) -> std::unique_ptr<x2l::LlmExecutor> {
            return std::make_unique<x2l::CpuLlmExecutor>(model, pool, o);
        });
        std::vector<float> all;
        s.eval(ids, &all);
        // decode path: drop the last two tokens and feed them one at a time
        const size_t n_vocab = all.size() / ids.size();
        s.truncate(static_cast<int64_t>(ids.size()) - 2);
        for (size_t i = ids.size() - 2; i < ids.size(); ++i) {
            s.eval({ids[i]});
            std::memcpy(all.data() + i * n_vocab, s.last_logits().data(), n_vocab * sizeof(float));
        }
        FILE* f = std::fopen(argv[3], "wb");
        if (!f || std::fwrite(all.data(), sizeof(float), all.size(), f) != all.size()) {
            std::fprintf(stderr, "cannot write %s\n", argv[3]);
            return 1;
        }
        std::fclose(f);
        std::printf("%zu tokens x %zu logits\n", ids.size(), n_vocab);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
