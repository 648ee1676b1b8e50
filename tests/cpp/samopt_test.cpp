// The C++ wrapper (bindings/cpp/samopt.hpp), compiled with -std=c++17 -Wall -Wextra -Werror
// -pedantic: numbers against a double reference written here, exceptions with status and message,
// RAII and moves, containers, groups, the base optimizer, checkpoints.
// Prints "N passed, M failed"; exits non-zero on any failure.
#include "samopt.hpp"

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static int passed = 0, failed = 0;

#define EXPECT(cond)                                                              \
    do {                                                                          \
        if (cond) {                                                               \
            ++passed;                                                             \
        } else {                                                                  \
            ++failed;                                                             \
            std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                         \
    } while (0)

template <class F>
static void expect_error(F &&f, SamStatus status, const char *needle) {
    try {
        f();
        ++failed;
        std::fprintf(stderr, "FAIL: no exception for %s\n", needle);
    } catch (const samopt::Error &e) {
        bool ok = e.status() == status && std::strstr(e.what(), needle) != nullptr;
        if (ok) {
            ++passed;
        } else {
            ++failed;
            std::fprintf(stderr, "FAIL: status %d, message \"%s\", wanted %d and \"%s\"\n", static_cast<int>(e.status()),
                         e.what(), static_cast<int>(status), needle);
        }
    }
}

static void first_and_second_step() {
    std::vector<float> w(1000), g(1000);
    std::array<float, 3> b{0.5f, -0.5f, 2.0f}, gb{0.0f, 3.0f, -4.0f};
    double sum = 0;
    for (size_t i = 0; i < w.size(); i++) {
        w[i] = std::sin(static_cast<float>(i));
        g[i] = std::cos(static_cast<float>(i) * 0.7f) * 0.01f;
        sum += static_cast<double>(g[i]) * g[i];
    }
    for (float x : gb) sum += static_cast<double>(x) * x;
    const double norm = std::sqrt(sum);
    const std::vector<float> w0 = w;
    const std::array<float, 3> b0 = b;

    samopt::Config config;
    config.rho = 0.1;
    samopt::Optimizer sam(config);
    EXPECT(sam.register_host(w, g) == 0);
    EXPECT(sam.register_host(b.data(), gb.data(), b.size()) == 1);
    EXPECT(sam.tensor_count() == 2);
    sam.first_step();
    EXPECT(sam.perturbed());
    EXPECT(std::fabs(sam.grad_norm() - norm) < 1e-9 * norm);
    double worst = 0;
    for (size_t i = 0; i < w.size(); i++) {
        double want = w0[i] + 0.1 * g[i] / norm;
        worst = std::fmax(worst, std::fabs(w[i] - want) / (std::fabs(want) * 0x1p-22 + 1e-30));
    }
    EXPECT(worst <= 1.0);
    EXPECT(std::fabs(b[2] - (2.0 + 0.1 * -4.0 / norm)) < 1e-6);
    EXPECT(sam.second_step() == samopt::Step::Done);
    EXPECT(std::memcmp(w.data(), w0.data(), w.size() * sizeof(float)) == 0);
    EXPECT(std::memcmp(b.data(), b0.data(), sizeof b) == 0);
    EXPECT(sam.step_count() == 1);
    EXPECT(sam.backend() == SAM_BACKEND_CPU);
}

static void errors_and_raii() {
    samopt::Config bad;
    bad.rho = -1;
    expect_error([&] { samopt::Optimizer o(bad); }, SAM_ERR_INVALID_ARGUMENT, "rho = -1");
    samopt::Optimizer sam;
    std::vector<float> w(4), g(3);
    expect_error([&] { sam.register_host(w, g); }, SAM_ERR_INVALID_ARGUMENT, "differ in size");
    expect_error([&] { sam.register_host(w.data(), w.data(), 4); }, SAM_ERR_INVALID_ARGUMENT, "overlap");
    expect_error([&] { sam.second_step(); }, SAM_ERR_INVALID_STATE, "second step without a first step");
    expect_error([&] { sam.adapter_info(); }, SAM_ERR_UNSUPPORTED, "not a GPU");
    std::vector<float> g4(4, 0.25f);
    sam.register_host(w, g4);
    g4[1] = NAN;
    expect_error([&] { sam.first_step(); }, SAM_ERR_NON_FINITE, "element 1");
    try {
        sam.set_lr(-1);
    } catch (const samopt::Error &e) {
        EXPECT(std::strcmp(e.status_string(), "invalid argument") == 0);
    }
    // Moves hand the handle over; the moved-from object destroys nothing.
    samopt::Optimizer moved = std::move(sam);
    EXPECT(moved.get() != nullptr && sam.get() == nullptr);
    EXPECT(moved.tensor_count() == 1);
    samopt::Optimizer other;
    other = std::move(moved);
    EXPECT(other.tensor_count() == 1);
    EXPECT(std::strlen(samopt::version()) > 0 && samopt::abi_version() == SAM_ABI_VERSION);
    for (const SamAdapterInfo &a : samopt::gpu_adapters()) EXPECT(a.name[0] != 0);
    {
        // The library's SamConfig layout is this header's, as the C++ compiler lays it out.
        const auto fields = samopt::config_layout();
        EXPECT(fields.size() > 30 && std::strcmp(fields.front().name, "struct_size") == 0 &&
               std::strcmp(fields.back().name, "preconditioned") == 0 &&
               fields.back().offset == offsetof(SamConfig, preconditioned) &&
               fields[1].offset == offsetof(SamConfig, rho));
    }
    samopt::set_log_callback(nullptr);
    // The Vulkan entry points translate errors the same way (tests/vulkan_interop.rs runs them on
    // a real device): a stale struct size, a missing instance, a CPU optimizer's registration.
    SamVulkanDevice vd{};
    vd.struct_size = 8;
    expect_error([&] { samopt::vulkan_required_extensions(vd); }, SAM_ERR_INVALID_ARGUMENT, "struct_size = 8");
    vd.struct_size = sizeof vd;
    expect_error([&] { samopt::Optimizer::on_vulkan(vd); }, SAM_ERR_NULL_POINTER, "get_instance_proc_addr");
    expect_error([&] { other.register_vulkan(1, 0, 2, 0, 16); }, SAM_ERR_UNSUPPORTED, "sam_create_vulkan");
}

// SGD with momentum through the plugin against the same formulas in double.
static void base_optimizer_groups_and_checkpoint() {
    samopt::Config config;
    config.base = SAM_BASE_SGD;
    config.lr = 0.1;
    config.momentum = 0.9;
    config.backend = SAM_BACKEND_CPU;
    samopt::Optimizer sam(config);
    std::vector<float> w{1.0f, -1.0f}, g{0.0f, 0.0f}, bias{0.5f}, gbias{0.0f};
    sam.register_host(w, g);
    uint32_t id = sam.register_host(bias, gbias);
    uint32_t half_lr = sam.add_group(0.5);
    sam.set_group(id, half_lr);
    double ref[3] = {1.0, -1.0, 0.5}, buf[3] = {0, 0, 0};
    for (int step = 0; step < 5; step++) {
        if (step == 3) sam.set_lr(0.05);
        const double lr = step >= 3 ? 0.05 : 0.1;
        const float g2[3] = {0.3f - 0.1f * static_cast<float>(step), 0.2f, -0.4f};
        g = {0.1f, 0.2f};
        gbias = {0.3f};
        sam.first_step();
        g = {g2[0], g2[1]};
        gbias = {g2[2]};
        EXPECT(sam.second_step() == samopt::Step::Done);
        for (int i = 0; i < 3; i++) {
            buf[i] = step == 0 ? g2[i] : 0.9 * buf[i] + g2[i];
            ref[i] -= (i == 2 ? lr * 0.5 : lr) * buf[i];
        }
    }
    EXPECT(std::fabs(w[0] - ref[0]) < 1e-6 && std::fabs(w[1] - ref[1]) < 1e-6 && std::fabs(bias[0] - ref[2]) < 1e-6);
    EXPECT(std::fabs(sam.lr() - 0.05) < 1e-15);
    std::vector<uint8_t> state = sam.save_state();
    EXPECT(!state.empty());
    sam.load_state(state);
    state[state.size() / 2] ^= 1;
    expect_error([&] { sam.load_state(state); }, SAM_ERR_IO, "corrupted");
    // A skipped step: inf in the second gradient.
    sam.first_step();
    g[0] = INFINITY;
    EXPECT(sam.second_step() == samopt::Step::Skipped);
    EXPECT(std::fabs(w[0] - ref[0]) < 1e-6);
}

// Per-shard accumulation and the global-norm calls.
static int32_t doubling(double *values, size_t count, void *user) {
    for (size_t i = 0; i < count; i++) values[i] *= 2;  // two identical workers
    ++*static_cast<int *>(user);
    return 0;
}

static void distributed_calls() {
    samopt::Config config;
    config.backend = SAM_BACKEND_CPU;
    samopt::Optimizer sam(config);
    std::vector<float> w{3.0f, 4.0f}, g{3.0f, 4.0f};
    // Per-shard SAM without a base optimizer leaves the mean in the gradient: a writable one.
    sam.register_host_writable(w, g);
    EXPECT(sam.grad_sq_norm_local() == 25.0);
    sam.first_step_with_norm(10.0);
    EXPECT(sam.grad_norm() == 10.0);
    g = {1.0f, 3.0f};
    sam.accumulate_step();
    EXPECT(w[0] == 3.0f && w[1] == 4.0f);
    g = {3.0f, 4.0f};
    sam.first_step();
    g = {3.0f, 5.0f};
    sam.accumulate_step();
    sam.second_step();
    EXPECT(g[0] == 2.0f && g[1] == 4.0f);  // the mean of the shards' perturbed gradients
    int calls = 0;
    sam.set_allreduce(doubling, &calls);
    g = {3.0f, 4.0f};
    sam.first_step();
    EXPECT(calls == 1 && std::fabs(sam.grad_norm() - std::sqrt(50.0)) < 1e-12);
    sam.second_step();
    sam.set_allreduce(nullptr);
}

// Device tensors on the GPU backend through the wrapper, when wgpu finds an adapter (lavapipe on
// CI). With SAMOPT_REQUIRE_GPU=1 (as CI sets) a missing adapter or any GPU error is a failure,
// never a skip.
static void gpu_device_tensors() {
    const char *require = std::getenv("SAMOPT_REQUIRE_GPU");
    bool required = require && std::strcmp(require, "1") == 0;
    if (samopt::gpu_adapters().empty()) {
        if (required) {
            ++failed;
            std::fprintf(stderr, "FAIL: SAMOPT_REQUIRE_GPU=1 but no GPU adapter\n");
        } else {
            std::printf("NOTICE: no GPU adapter, GPU checks skipped\n");
        }
        return;
    }
    try {
        samopt::Config config;
        config.backend = SAM_BACKEND_GPU;
        config.rho = 0.5;
        samopt::Optimizer sam(config);
        EXPECT(sam.backend() == SAM_BACKEND_GPU);
        const std::array<float, 3> w{1.0f, 2.0f, -2.0f}, g{0.3f, 0.0f, 0.4f};
        std::array<float, 3> out{};
        uint32_t id = sam.tensor_create(3);
        sam.tensor_write(id, SAM_PART_PARAM, w.data(), 3);
        sam.tensor_write(id, SAM_PART_GRAD, g.data(), 3);
        sam.first_step();
        sam.tensor_read(id, SAM_PART_PARAM, out.data(), 3);
        // ||g|| = 0.5: e = 0.5 * g / 0.5 = g.
        for (int i = 0; i < 3; i++) EXPECT(std::fabs(out[i] - (double(w[i]) + g[i])) < 1e-6);
        sam.second_step();
        sam.tensor_read(id, SAM_PART_PARAM, out.data(), 3);
        EXPECT(out == w);
        EXPECT(std::strlen(sam.adapter_info().name) > 0);
    } catch (const samopt::Error &e) {
        ++failed;
        std::fprintf(stderr, "FAIL: GPU: %s\n", e.what());
    }
}

// Step schedules through the wrapper: interval 2 with the built-in SGD, First::SingleGradient on
// odd steps (weights not moved), the update with the plain gradient against a double reference.
static void schedules() {
    samopt::Config config;
    config.base = SAM_BASE_SGD;
    config.lr = 0.5;
    config.schedule = SAM_SCHEDULE_INTERVAL;
    config.schedule_k = 2;
    samopt::Optimizer sam(config);
    std::vector<float> w{1.0f, -2.0f, 0.5f}, g(3);
    std::vector<double> ref(w.begin(), w.end());
    sam.register_host(w, g);
    for (int t = 0; t < 4; t++) {
        for (int i = 0; i < 3; i++) g[i] = 0.1f * static_cast<float>(i + t);
        const std::vector<float> before = w;
        samopt::First first = sam.first_step();
        EXPECT(first == (t % 2 == 0 ? samopt::First::Perturbed : samopt::First::SingleGradient));
        if (first == samopt::First::SingleGradient) EXPECT(w == before);
        EXPECT(sam.second_step() == samopt::Step::Done);
        for (int i = 0; i < 3; i++) {
            ref[i] = static_cast<float>(ref[i] - 0.5 * g[i]);
            EXPECT(std::fabs(w[i] - ref[i]) < 1e-6);
        }
    }
    EXPECT(sam.schedule_counts() == std::make_pair(uint64_t{2}, uint64_t{2}));
    sam.set_rho(0.25);
    EXPECT(sam.rho() == 0.25);
    expect_error([&] { sam.set_rho(0.0); }, SAM_ERR_INVALID_ARGUMENT, "rho = 0");
    // Rebinding to new containers keeps the tensor: the next update lands in the new containers.
    std::vector<float> w2 = w, g2(3, 0.0f);
    sam.rebind_host(0, w2, g2);
    for (int i = 0; i < 3; i++) g2[i] = 0.2f;
    EXPECT(sam.first_step() == samopt::First::Perturbed);
    EXPECT(sam.second_step() == samopt::Step::Done);
    for (int i = 0; i < 3; i++) EXPECT(std::fabs(w2[i] - static_cast<float>(ref[i] - 0.5 * 0.2)) < 1e-6);
    std::vector<float> short_w(2), short_g(2);
    expect_error([&] { sam.rebind_host(0, short_w, w2); }, SAM_ERR_INVALID_ARGUMENT, "differ in size");
    // Loss scaling: an overflow is First::Skipped, then Step::Skipped, and the scale backs off.
    samopt::Config scaled;
    scaled.base = SAM_BASE_SGD;
    scaled.loss_scale = 64.0;
    samopt::Optimizer ls(scaled);
    std::vector<float> lw{1.0f, 2.0f}, lg{NAN, 0.0f};
    ls.register_host(lw, lg);
    EXPECT(ls.first_step() == samopt::First::Skipped);
    EXPECT(ls.second_step() == samopt::Step::Skipped);
    EXPECT(ls.loss_scale() == 32.0 && lw[0] == 1.0f && lw[1] == 2.0f);
    samopt::Config bad;
    bad.schedule = SAM_SCHEDULE_LOOKSAM;
    bad.schedule_k = 0;
    expect_error([&] { samopt::Optimizer o(bad); }, SAM_ERR_INVALID_ARGUMENT, "schedule_k = 0");
}

int main() {
    first_and_second_step();
    errors_and_raii();
    base_optimizer_groups_and_checkpoint();
    distributed_calls();
    schedules();
    gpu_device_tensors();
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
