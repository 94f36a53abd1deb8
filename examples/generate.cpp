// generate — continue a prompt with a pretrained model (a llama2.c checkpoint or a Hugging Face
// folder of any structure examples/model_dispatch.hpp is compiled for: dense Llama, Switch, Mixtral,
// GPT), on the CPU, with a KV cache; prints the prompt followed by its continuation.
//
//   generate --model models/switch-brown --prompt "The" --steps 40 --temperature 0
//   generate --model ../shared/models/stories260K.bin --prompt "Once upon a time" --steps 100 --temperature 0.8
//   generate --model M [--tokenizer T] --prompt TEXT [--steps N] [--temperature T] [--top-p P] [--seed S]
//            [--no-stop] [--json PATH]
//
// The tokenizer defaults to the model's own (tokenizer.model in the folder, tok<vocab>.bin next to a
// .bin). For a mixture-of-experts model --json also records the expert load of the text: how the
// routers spread the positions the model read while generating (the prompt and the continuation).
//
// Exit status: 0 done, 1 an error in a file (model, tokenizer), 2 a bad command line.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include <mopt/mopt.hpp>

#include "cli.hpp"
#include "model_dispatch.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace mopt;
using cli::usage_check;

namespace {

struct Options {
    std::string model, tokenizer, prompt, json;
    std::int64_t steps = 256;
    float temperature = 1.0f, top_p = 0.9f;
    std::uint64_t seed = 1;
    bool no_stop = false;
};

// The routing of `ids` fed to the model as generation fed them — the prompt in one forward, then one
// token per step through the KV cache — so that capacity limits act as they did while generating
// (a one-token step never overflows an expert; a whole-text forward could). Per expert layer: the
// share of assignments each expert got, dropped assignments, mean router entropy.
// ids: [P + n] with the prompt's P tokens first -> one JSON object per expert layer
template <class Model>
nlohmann::json expert_load(Model& model, std::span<const std::int32_t> ids, std::int64_t prompt_len) {
    struct Load {
        std::int64_t layer = 0, tokens = 0, dropped = 0;
        std::vector<double> fraction;
        double entropy = 0.0;
    };
    std::vector<Load> load;
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    const auto n = static_cast<std::int64_t>(ids.size());
    nn::KVCache cache(model.config(), 1, n);
    for (std::int64_t begin = 0; begin < n;) {
        const std::int64_t len = begin == 0 ? prompt_len : 1;
        tape.reset();
        const Tensor in = Tensor::from({1, len}, ids.subspan(static_cast<std::size_t>(begin), static_cast<std::size_t>(len)));
        const nn::ForwardOutput o = model.forward(tape, in, {.cache = &cache});
        load.resize(o.experts.size());
        for (std::size_t l = 0; l < o.experts.size(); ++l) {
            const nn::ExpertStats& s = o.experts[l];
            Load& e = load[l];
            e.layer = s.layer;
            e.fraction.resize(s.fraction.size(), 0.0);
            const auto w = static_cast<double>(s.tokens);  // statistics are means over this forward's tokens
            for (std::size_t i = 0; i < s.fraction.size(); ++i) e.fraction[i] += s.fraction[i] * w;
            e.entropy += s.router_entropy * w;
            e.tokens += s.tokens;
            e.dropped += s.dropped;
        }
        begin += len;
    }
    nlohmann::json out = nlohmann::json::array();
    for (Load& e : load) {
        for (double& f : e.fraction) f /= static_cast<double>(e.tokens);
        out.push_back({{"layer", e.layer}, {"fraction", e.fraction}, {"dropped", e.dropped}, {"tokens", e.tokens},
                       {"router_entropy", e.entropy / static_cast<double>(e.tokens)}});
    }
    return out;
}

template <class Model>
int continue_prompt(const Options& o, Model& model) {
    const nn::ModelConfig& c = model.config();
    fs::path tok_path;
    const data::Tokenizer tok = examples::load_tokenizer(o.tokenizer, o.model, c.vocab_size, tok_path);
    std::vector<std::int32_t> ids = tok.encode(o.prompt);  // BOS first
    const auto P = static_cast<std::int64_t>(ids.size());
    usage_check(P <= c.max_seq, "--prompt is ", P, " tokens long but the model's context is max_seq = ", c.max_seq);
    std::int64_t steps = o.steps;
    if (P + steps - 1 > c.max_seq) {
        const std::int64_t fit = c.max_seq - P + 1;
        std::fprintf(stderr, "generate: --steps %lld reduced to %lld: the prompt (%lld tokens) and the text must fit "
                     "the model's context of %lld positions\n",
                     static_cast<long long>(steps), static_cast<long long>(fit), static_cast<long long>(P),
                     static_cast<long long>(c.max_seq));
        steps = fit;
    }

    const auto start = std::chrono::steady_clock::now();
    const std::vector<std::int32_t> cont = eval::generate(
        model, ids, {.steps = steps, .temperature = o.temperature, .top_p = o.top_p, .seed = o.seed,
                     .stop_at_eos = !o.no_stop});
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::vector<std::int32_t> all = ids;
    all.insert(all.end(), cont.begin(), cont.end());
    const std::string text = tok.decode(all);
    std::printf("%s\n", text.c_str());
    std::fflush(stdout);  // the text before the statistics on stderr, also when both go to a terminal
    const double tps = seconds > 0 ? static_cast<double>(cont.size()) / seconds : 0.0;
    std::fprintf(stderr, "generate: %s, %zu tokens in %.3f s (%.1f tokens/s; prompt %lld tokens)\n",
                 Model::structure().describe().c_str(), cont.size(), seconds, tps, static_cast<long long>(P));
    if (o.json.empty()) return 0;

    const std::string prompt_text = tok.decode(ids);
    nlohmann::json j{{"model", o.model},
                     {"structure", Model::structure().describe()},
                     {"tokenizer", tok_path.string()},
                     {"prompt", o.prompt},
                     {"text", text},
                     {"continuation", text.substr(std::min(text.size(), prompt_text.size()))},
                     {"prompt_tokens", ids},
                     {"tokens", cont},
                     {"steps", steps},
                     {"temperature", o.temperature},
                     {"top_p", o.top_p},
                     {"seed", o.seed},
                     {"seconds", seconds},
                     {"tokens_per_second", tps}};
    if constexpr (Model::FFN::has_experts) {
        // Generation reads every generated token but the last unless a stop token ended it first
        // (then the last one was read to choose the stop token).
        const std::size_t read = ids.size() + cont.size() -
                                 (static_cast<std::int64_t>(cont.size()) == steps && !cont.empty() ? 1 : 0);
        j["expert_load"] = expert_load(model, std::span<const std::int32_t>(all.data(), read), P);
        std::fprintf(stderr, "generate: expert load (share of the %zu positions read, per expert):", read);
        for (const auto& layer : j["expert_load"]) {
            std::fprintf(stderr, "\n  layer %lld:", static_cast<long long>(layer["layer"].get<std::int64_t>()));
            for (const auto& f : layer["fraction"]) std::fprintf(stderr, " %.2f", f.get<double>());
        }
        std::fprintf(stderr, "\n");
    }
    cli::write_json(o.json, j);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return cli::run("generate", [&] {
        Options o;
        po::options_description opts(
            "generate: continue a prompt with a pretrained model (llama2.c .bin or Hugging Face folder)\n"
            "usage: generate --model PATH --prompt TEXT [options]");
        opts.add_options()("help,h", "show this help");
        examples::add_model_options(opts, o.model, o.tokenizer);
        opts.add_options()
            ("prompt", po::value(&o.prompt)->required(), "text to continue")
            ("steps", po::value(&o.steps)->default_value(o.steps), "tokens to generate (fewer if the model ends the text)")
            ("temperature", po::value(&o.temperature)->default_value(o.temperature), "sampling temperature; 0 = greedy")
            ("top-p", po::value(&o.top_p)->default_value(o.top_p, "0.9"), "nucleus sampling mass in (0, 1]; 1 = off")
            ("seed", po::value(&o.seed)->default_value(o.seed), "random seed of the sampler")
            ("no-stop", po::bool_switch(&o.no_stop), "keep going past the end-of-text token (EOS, or BOS that starts a new text)")
            ("json", po::value(&o.json),
             "also write the text, token ids, timing (and a mixture-of-experts model's expert load) as JSON here");
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;
        usage_check(o.steps > 0, "--steps must be positive, got ", o.steps);
        usage_check(std::isfinite(o.temperature) && o.temperature >= 0.0f,
                    "--temperature must be >= 0 (0 = greedy), got ", o.temperature);
        usage_check(std::isfinite(o.top_p) && o.top_p > 0.0f && o.top_p <= 1.0f, "--top-p must be in (0, 1], got ",
                    o.top_p);
        usage_check(!o.prompt.empty(), "--prompt is empty; give some text to continue");
        examples::check_model_paths(o.model, o.tokenizer);
        return examples::with_model(o.model, [&](auto& model) { return continue_prompt(o, model); });
    });
}
