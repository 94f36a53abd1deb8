#pragma once
// Training checkpoints that survive a crash at any moment.
//
//   run_dir/
//     step-000400/        model.safetensors (every parameter, f32), optimizer.bin, state.json
//     step-000600/
//     latest              the name of the newest complete checkpoint ("step-000600")
//
// A checkpoint is written into a hidden temporary folder, renamed to step-NNNNNN when complete, and
// only then does `latest` (rewritten through a temporary file and rename) point at it. A crash
// mid-write leaves the previous checkpoint and `latest` intact; resuming reads `latest`. Older
// checkpoints beyond `keep` are removed after the new one is in place.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mopt/autodiff/parameter.hpp"
#include "mopt/io/safetensors.hpp"

namespace mopt::train {

// What a training loop needs to continue exactly where it stopped (besides weights and moments).
struct TrainingState {
    std::int64_t step = 0;     // updates done
    nlohmann::json extra;      // loop-specific: data position, best validation loss, flags, …
};

namespace detail {
inline std::string step_name(std::int64_t step) {
    std::string digits = std::to_string(step);
    return "step-" + std::string(digits.size() < 6 ? 6 - digits.size() : 0, '0') + digits;
}
inline void write_text_atomically(const std::filesystem::path& file, const std::string& text) {
    std::random_device rd;
    const auto tmp = file.parent_path() / ("." + file.filename().string() + ".tmp-" + std::to_string(rd()));
    {
        std::ofstream out(tmp, std::ios::trunc);
        check(out.good(), "checkpoint: cannot create ", tmp.string());
        out << text;
        out.flush();
        check(!out.fail(), "checkpoint: writing ", tmp.string(), " failed (disk full?)");
    }
    std::error_code ec;
    std::filesystem::rename(tmp, file, ec);
    if (ec) std::filesystem::remove(tmp, ec);
    check(!ec, "checkpoint: cannot move ", tmp.string(), " to ", file.string());
}
// An optimizer whose state may live on a device (train::AdamW::fetch) brings it to the host.
template <class Optimizer>
void fetch_state(const Optimizer& o) {
    if constexpr (requires { o.fetch(); }) o.fetch();
}

}  // namespace detail

// Saves parameters, every optimizer's state (in order) and `state` as run_dir/step-NNNNNN; keeps the
// newest `keep` checkpoints. Returns the checkpoint's folder.
template <class... Optimizers>
std::filesystem::path save_checkpoint(const std::filesystem::path& run_dir, const TrainingState& state,
                                      const std::vector<autodiff::Parameter*>& params, int keep,
                                      const Optimizers&... optimizers) {
    namespace fs = std::filesystem;
    fs::create_directories(run_dir);
    const std::string name = detail::step_name(state.step);
    std::random_device rd;
    const fs::path tmp = run_dir / (".tmp-" + name + "-" + std::to_string(rd()));
    fs::create_directories(tmp);
    try {
        (detail::fetch_state(optimizers), ...);  // a device that runs the optimizer: its state, here first
        std::map<std::string, Tensor> tensors;
        for (auto* p : params) {
            check(!tensors.contains(p->name()), "save_checkpoint: two parameters are named '", p->name(), "'");
            tensors.emplace(p->name(), p->value());
        }
        io::write_safetensors(tmp / "model.safetensors", tensors);
        {
            std::ofstream os(tmp / "optimizer.bin", std::ios::binary | std::ios::trunc);
            check(os.good(), "save_checkpoint: cannot create ", (tmp / "optimizer.bin").string());
            (optimizers.save(os), ...);
            os.flush();
            check(!os.fail(), "save_checkpoint: writing ", (tmp / "optimizer.bin").string(), " failed (disk full?)");
        }
        nlohmann::json j{{"step", state.step}, {"extra", state.extra}};
        detail::write_text_atomically(tmp / "state.json", j.dump(1));
        const fs::path final_dir = run_dir / name;
        if (fs::exists(final_dir)) fs::remove_all(final_dir);  // a re-run of the same step replaces it
        fs::rename(tmp, final_dir);
    } catch (...) {
        std::error_code ec;
        fs::remove_all(tmp, ec);
        throw;
    }
    detail::write_text_atomically(run_dir / "latest", name + "\n");
    // Prune: keep the newest `keep` complete checkpoints (and never the one just written).
    std::vector<fs::path> all;
    for (const auto& e : fs::directory_iterator(run_dir))
        if (e.is_directory() && e.path().filename().string().starts_with("step-")) all.push_back(e.path());
    std::sort(all.begin(), all.end());
    for (std::size_t i = 0; keep > 0 && i + static_cast<std::size_t>(keep) < all.size(); ++i) {
        std::error_code ec;
        fs::remove_all(all[i], ec);
    }
    return run_dir / name;
}

// Restores the checkpoint `latest` names into params and optimizers; nothing (std::nullopt) when
// run_dir holds no checkpoint. A damaged checkpoint is an error naming its file.
template <class... Optimizers>
std::optional<TrainingState> load_latest_checkpoint(const std::filesystem::path& run_dir,
                                                    const std::vector<autodiff::Parameter*>& params,
                                                    Optimizers&... optimizers) {
    namespace fs = std::filesystem;
    const fs::path latest = run_dir / "latest";
    if (!fs::exists(latest)) return std::nullopt;
    std::string name;
    {
        std::ifstream in(latest);
        std::getline(in, name);
    }
    check(name.starts_with("step-") && name.find('/') == std::string::npos, "load_latest_checkpoint: ",
          latest.string(), " names '", name, "', not a checkpoint folder");
    const fs::path dir = run_dir / name;
    check(fs::is_directory(dir), "load_latest_checkpoint: ", latest.string(), " names ", dir.string(),
          ", which does not exist");
    io::SafetensorsFile f = io::read_safetensors(dir / "model.safetensors");
    for (auto* p : params) {
        auto it = f.tensors.find(p->name());
        check(it != f.tensors.end(), "load_latest_checkpoint: ", (dir / "model.safetensors").string(),
              " has no tensor '", p->name(), "'");
        check(it->second.shape() == p->shape(), "load_latest_checkpoint: ", (dir / "model.safetensors").string(),
              ": tensor '", p->name(), "' has shape ", it->second.shape(), ", the model expects ", p->shape());
        p->value().copy_from(it->second);
    }
    {
        std::ifstream is(dir / "optimizer.bin", std::ios::binary);
        check(is.good(), "load_latest_checkpoint: cannot open ", (dir / "optimizer.bin").string());
        try {
            (optimizers.load(is), ...);
        } catch (const Error& e) {
            throw Error(mopt::detail::concat((dir / "optimizer.bin").string(), ": ", e.what()));
        }
    }
    nlohmann::json j;
    try {
        std::ifstream in(dir / "state.json");
        j = nlohmann::json::parse(in);
        TrainingState s;
        s.step = j.at("step").get<std::int64_t>();
        s.extra = j.value("extra", nlohmann::json::object());
        return s;
    } catch (const nlohmann::json::exception& e) {
        throw Error(mopt::detail::concat((dir / "state.json").string(), ": malformed training state: ", e.what()));
    }
}

}  // namespace mopt::train
