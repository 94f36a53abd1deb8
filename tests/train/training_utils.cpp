// Tests of the training loop's utilities: the warmup + cosine schedule, crash-safe checkpoints with
// exact resume, the CSV log's resume truncation and the progress line.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <catch2/catch.hpp>

#include "test_util.hpp"

using namespace mopt;
using mopt::autodiff::Parameter;

namespace {
void fake_gradients(const std::vector<Parameter*>& ps, std::uint64_t seed) {
    for (auto* p : ps) p->grad().copy_from(test::random_tensor(p->shape(), seed++));
}
}  // namespace

TEST_CASE("WarmupCosine rises linearly, peaks after warmup and decays to min_ratio", "[train][schedule]") {
    train::WarmupCosine s{.peak_lr = 1e-3f, .warmup_steps = 10, .total_steps = 110, .min_ratio = 0.1f};
    s.validate();
    CHECK(s(0) == Approx(1e-4f));
    CHECK(s(4) == Approx(5e-4f));
    CHECK(s(9) == Approx(1e-3f));
    CHECK(s(10) == Approx(1e-3f));
    CHECK(s(60) == Approx(1e-3f * (0.1f + 0.9f * 0.5f)));  // half-way through the cosine
    CHECK(s(110) == Approx(1e-4f));
    CHECK(s(500) == Approx(1e-4f));
    for (std::int64_t i = 10; i < 110; ++i) CHECK(s(i + 1) <= s(i));
    CHECK_THROWS_WITH((train::WarmupCosine{.peak_lr = 1e-3f, .warmup_steps = 20, .total_steps = 10}.validate()),
                      Catch::Contains("warmup_steps 20"));
}

TEST_CASE("Checkpoints restore weights and optimizer moments exactly; training continues identically",
          "[train][checkpoint]") {
    const test::TempDir tmp("mopt_train_resume");
    const std::filesystem::path& dir = tmp.path;
    Parameter a("a", test::random_tensor({3, 4}, 1)), b("b", test::random_tensor({5}, 2));
    std::vector<Parameter*> ps{&a, &b};
    train::AdamW opt(ps, {.lr = 0.01f});
    for (int s = 0; s < 3; ++s) {
        fake_gradients(ps, 10 + s);
        opt.step();
    }
    train::save_checkpoint(dir, {.step = 3, .extra = {{"epoch", 1}}}, ps, 2, opt);
    // Continue three more steps: the reference trajectory.
    for (int s = 3; s < 6; ++s) {
        fake_gradients(ps, 10 + s);
        opt.step();
    }
    const Tensor a_ref = a.value().clone(), b_ref = b.value().clone();

    Parameter a2("a", Tensor::zeros({3, 4})), b2("b", Tensor::zeros({5}));
    std::vector<Parameter*> ps2{&a2, &b2};
    train::AdamW opt2(ps2, {.lr = 0.01f});
    auto st = train::load_latest_checkpoint(dir, ps2, opt2);
    REQUIRE(st.has_value());
    CHECK(st->step == 3);
    CHECK(st->extra.at("epoch") == 1);
    CHECK(opt2.steps() == 3);
    for (int s = 3; s < 6; ++s) {
        fake_gradients(ps2, 10 + s);
        opt2.step();
    }
    CHECK(std::memcmp(a2.value().f32(), a_ref.f32(), a_ref.bytes()) == 0);
    CHECK(std::memcmp(b2.value().f32(), b_ref.f32(), b_ref.bytes()) == 0);
}

TEST_CASE("A failed or interrupted checkpoint write leaves the previous checkpoint in force", "[train][checkpoint]") {
    const test::TempDir tmp("mopt_train_crash");
    const std::filesystem::path& dir = tmp.path;
    Parameter a("a", test::random_tensor({4}, 3));
    std::vector<Parameter*> ps{&a};
    train::SGD opt(ps, {.lr = 0.1f});
    train::save_checkpoint(dir, {.step = 1}, ps, 3, opt);
    const Tensor saved = a.value().clone();

    // A write that fails half-way (two parameters with one name) throws and leaves no trace.
    Parameter dup("a", test::random_tensor({4}, 4));
    std::vector<Parameter*> bad{&a, &dup};
    CHECK_THROWS_WITH(train::save_checkpoint(dir, {.step = 2}, bad, 3, opt), Catch::Contains("two parameters"));
    // A process killed mid-write leaves a hidden temporary folder and a step folder without `latest`.
    std::filesystem::create_directories(dir / ".tmp-step-000002-123");
    std::ofstream(dir / ".tmp-step-000002-123" / "model.safetensors") << "partial";
    a.value().fill(7.0f);
    auto st = train::load_latest_checkpoint(dir, ps, opt);
    REQUIRE(st.has_value());
    CHECK(st->step == 1);
    CHECK(std::memcmp(a.value().f32(), saved.f32(), saved.bytes()) == 0);

    // Pruning keeps the newest `keep` checkpoints.
    for (int s = 2; s <= 5; ++s) train::save_checkpoint(dir, {.step = s}, ps, 2, opt);
    int folders = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir))
        folders += e.path().filename().string().starts_with("step-");
    CHECK(folders == 2);
    CHECK(std::filesystem::exists(dir / "step-000005"));
    CHECK(std::filesystem::exists(dir / "step-000004"));

    // A damaged `latest` or checkpoint is an error naming the file.
    std::ofstream(dir / "latest") << "../../etc\n";
    CHECK_THROWS_WITH(train::load_latest_checkpoint(dir, ps, opt), Catch::Contains("latest"));
    std::ofstream(dir / "latest") << "step-000005\n";
    std::ofstream(dir / "step-000005" / "state.json") << "{not json";
    CHECK_THROWS_WITH(train::load_latest_checkpoint(dir, ps, opt), Catch::Contains("state.json"));
    Parameter other("other", Tensor::zeros({4}));
    std::vector<Parameter*> wrong{&other};
    CHECK_THROWS_WITH(train::load_latest_checkpoint(dir, wrong, opt), Catch::Contains("'other'"));
    CHECK_FALSE(train::load_latest_checkpoint(dir / "missing", ps, opt).has_value());
}

TEST_CASE("CsvLog keeps only the rows up to the resumed step", "[train][csv]") {
    const test::TempDir tmp("mopt_train_csv");
    const std::filesystem::path& dir = tmp.path;
    const auto file = dir / "log.csv";
    {
        train::CsvLog log(file, {"step", "loss"});
        for (int s = 1; s <= 5; ++s) log.row({std::to_string(s), train::CsvLog::cell(1.0 / s)});
    }
    {
        train::CsvLog log(file, {"step", "loss"}, 3);
        log.row({"4", "9"});
    }
    std::ifstream in(file);
    std::string all((std::istreambuf_iterator<char>(in)), {});
    CHECK(all == "step,loss\n1,1\n2,0.5\n3,0.3333333\n4,9\n");
    CHECK_THROWS_WITH(train::CsvLog(file, {"step", "other"}, 2), Catch::Contains("columns"));
    CHECK_THROWS_WITH(train::CsvLog(file, {"loss"}), Catch::Contains("'step'"));
}

TEST_CASE("Progress prints step, loss, throughput and ETA", "[train][progress]") {
    std::FILE* f = std::tmpfile();
    REQUIRE(f != nullptr);
    train::Progress p(4, 0, 2, f);
    for (int s = 1; s <= 4; ++s) p.update(s, 100, 2.5, "lr 1e-3");
    std::rewind(f);
    std::string text;
    for (int c; (c = std::fgetc(f)) != EOF;) text.push_back(static_cast<char>(c));
    std::fclose(f);
    CHECK(text.find("2/4 loss 2.5000") != std::string::npos);
    CHECK(text.find("4/4 loss 2.5000") != std::string::npos);
    CHECK(text.find("1/4") == std::string::npos);  // not a terminal: every 2 steps only
    CHECK(text.find("tok/s") != std::string::npos);
    CHECK(train::Progress::clock_text(3725) == "1h02m");
    CHECK(train::Progress::clock_text(65) == "1m05s");
}
