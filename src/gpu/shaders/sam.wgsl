// SAM's GPU passes over one window of one arena: the ascent norm, the perturbation, the restore,
// (only after a norm pass saw NaN or infinity) the search for the first non-finite element, and
// with a built-in base optimizer the second gradient's reduction and the restore fused with
// PyTorch's SGD or AdamW update; for the step schedules, the single-gradient step's update and
// LookSAM's two passes (keeping g_v, and writing its direction into the gradients).
//
// An arena holds the tensors of one dtype end to end, each padded to 16 bytes with zeros; a window
// is the part of an arena one storage binding can hold. Padding is inert: its gradient is zero, so
// it adds nothing to the norm and is not moved by the perturbation.
//
// Every dtype is read as u32 words, four at a time: one f32 per word, or two f16/bf16 halves (low
// half first). Half conversions are integer code rounding to nearest even, so the bits do not
// depend on how a driver implements pack2x16float. The formulas mirror src/math.rs:
//   p = 2:    e = rho * T_w^2 * g / (||T_w g|| + eps) = ((T_w * T_w) * g) * scale
//   p = inf:  e = rho * T_w * sign(g)
// with T_w = |w| + eta under ASAM and 1 otherwise.

// Specialised per pipeline, so the loops carry no branches on them.
override DTYPE: u32 = 0u;         // 0 f32, 1 f16, 2 bf16
override ADAPTIVE: bool = false;  // ASAM
override SIGN: bool = false;      // p = infinity
override BASE: u32 = 0u;          // 0 none, 1 SGD, 2 AdamW
override MOMENTUM: bool = false;  // SGD with a momentum buffer (in state_m)
override GSAM: bool = false;      // the update's direction a*g' - b*g reads the first gradient
override KEEP_FIRST: bool = false; // GSAM or LookSAM: the perturbation keeps the first gradient
override LOOK: bool = false;      // LookSAM: binding 2 holds g_v in the schedule's passes
override MASTER: bool = false;    // f32 master weights (half arenas): binding 3 holds them in the updates
override PRECOND: bool = false;   // AdamW-preconditioned perturbation: g -> g / (sqrt(v)/b + eps)

const WORKGROUP: u32 = 256u;

struct Window {
    quads: u32,        // 16-byte groups of words in this window
    slot: u32,         // first partial-sum slot of this window
    index: u32,        // this window's entry in first_bad
    fresh: u32,        // master weights: the arena's first update, so the copy is taken from w
    lr: f32,           // the arena's learning rate (lr times its group's scale)
    weight_decay: f32, // SGD: added to the gradient
    keep: f32,         // SGD: buf <- keep*buf + take*d
    take: f32,
    decay: f32,        // AdamW: 1 - lr * weight_decay
    step_size: f32,    // AdamW: lr / (1 - beta1^t)
    bias2_sqrt: f32,   // AdamW: sqrt(1 - beta2^t)
    pre_bias2_sqrt: f32, // the preconditioned perturbation: sqrt(1 - beta2^t) so far, 0 for plain SAM
}

struct Step {
    scale: f32,        // rho / (n + eps), or rho for the sign perturbation
    eta: f32,
    a: f32,            // direction a * g' - b * g (b = 0 without GSAM)
    b: f32,
    nd: f32,           // SGD: d <- nd*d + nb*buf
    nb: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    adam_eps: f32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read_write> param: array<vec4<u32>>;
// Only read; declared read_write so that a parameter and its gradient may share one buffer (see
// the bind group layout in mod.rs).
@group(0) @binding(1) var<storage, read_write> grad: array<vec4<u32>>;
// The backup of w; in LookSAM's passes (look_store, update_single, look_direction) the bind group
// puts g_v here instead, f32 laid out as the state (see look_at).
@group(0) @binding(2) var<storage, read_write> backup: array<vec4<u32>>;
// Per workgroup of a reduction: (bits of the f32 scaled sum of squares q, bits of the partial dot
// product (second reduction only), non-finite flag, the scale's exponent k as i32 bits); the sum
// of squares is q * 2^(2k) (see "scaled sums of squares" below). In the update passes of a half
// arena with master weights (which reduce nothing) the bind group puts the f32 master weights
// here instead, laid out as the state (see master_at).
@group(0) @binding(3) var<storage, read_write> partials: array<vec4<u32>>;
@group(0) @binding(4) var<uniform> window: Window;
@group(0) @binding(5) var<uniform> step: Step;
// Per window: the first non-finite element's index within the window (u32 max: none).
@group(0) @binding(6) var<storage, read_write> first_bad: array<atomic<u32>>;
// GSAM: the first gradient, saved by the perturbation pass, laid out as grad.
@group(0) @binding(7) var<storage, read_write> first_grad: array<vec4<u32>>;
// The base optimizer's f32 state, four elements per vec4: the momentum buffer or Adam's first
// moment, and Adam's second moment.
@group(0) @binding(8) var<storage, read_write> state_m: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> state_v: array<vec4<f32>>;

var<workgroup> scratch: array<f32, WORKGROUP>;
var<workgroup> scratch_exp: array<i32, WORKGROUP>;
var<workgroup> scratch_dot: array<f32, WORKGROUP>;
var<workgroup> scratch_flag: array<u32, WORKGROUP>;

// ---- half precision as integer code ----

fn f16_to_f32(h: u32) -> f32 {
    let o = (h & 0x7fffu) << 13u;
    let exp = o & 0x0f800000u;
    var bits = o + 0x38000000u;                                   // rebias 15 -> 127
    if (exp == 0x0f800000u) {
        bits = bits + 0x38000000u;                                // infinity / NaN
    } else if (exp == 0u) {
        bits = bitcast<u32>(bitcast<f32>(bits + 0x00800000u) - bitcast<f32>(0x38800000u)); // subnormal
    }
    return bitcast<f32>(bits | ((h & 0x8000u) << 16u));
}

fn f32_to_f16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let f = b & 0x7fffffffu;
    var o: u32;
    if (f >= 0x47800000u) {
        o = select(0x7c00u, 0x7e00u, f > 0x7f800000u);             // overflow to inf, or NaN
    } else if (f < 0x38800000u) {
        // Subnormal or zero: the f32 adder rounds, with a magic number that aligns the bits.
        o = bitcast<u32>(bitcast<f32>(f) + bitcast<f32>(0x3f000000u)) - 0x3f000000u;
    } else {
        let odd = (f >> 13u) & 1u;
        o = (f + 0xc8000fffu + odd) >> 13u;                       // rebias, round to nearest even
    }
    return o | sign;
}

fn f32_to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;                                // NaN stays a quiet NaN
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// Element h (0 or 1) of a word, as f32.
fn element(word: u32, h: u32) -> f32 {
    if (DTYPE == 0u) {
        return bitcast<f32>(word);
    }
    let bits = (word >> (16u * h)) & 0xffffu;
    if (DTYPE == 1u) {
        return f16_to_f32(bits);
    }
    return bitcast<f32>(bits << 16u);
}

fn to_half(x: f32) -> u32 {
    if (DTYPE == 1u) {
        return f32_to_f16(x);
    }
    return f32_to_bf16(x);
}

// `word` with element h (0 or 1) set to x, rounded to the dtype (the word starts at 0 and takes
// its halves in order).
fn with_element(word: u32, h: u32, x: f32) -> u32 {
    if (DTYPE == 0u) {
        return bitcast<u32>(x);
    }
    return word | (to_half(x) << (16u * h));
}

// Whether element h of a word is NaN or infinite, by its exponent bits: a driver may assume
// finite math, a bit test cannot be optimised away.
fn non_finite(word: u32, h: u32) -> bool {
    if (DTYPE == 0u) {
        return (word & 0x7f800000u) == 0x7f800000u;
    }
    let bits = (word >> (16u * h)) & 0xffffu;
    if (DTYPE == 1u) {
        return (bits & 0x7c00u) == 0x7c00u;
    }
    return (bits & 0x7f80u) == 0x7f80u;
}

fn per_word() -> u32 {
    return select(2u, 1u, DTYPE == 0u);
}

// ---- the SAM formulas ----

fn t_w(w: f32) -> f32 {
    if (ADAPTIVE) {
        return abs(w) + step.eta;
    }
    return 1.0;
}

fn perturbed(w: f32, g: f32) -> f32 {
    let t = t_w(w);
    var e: f32;
    if (SIGN) {
        e = step.scale * sign(g);
        if (ADAPTIVE) {
            e = e * t;
        }
    } else {
        e = ((t * t) * g) * step.scale;
    }
    return w + e;
}

fn perturbed_word(w: u32, g: u32) -> u32 {
    if (DTYPE == 0u) {
        return bitcast<u32>(perturbed(bitcast<f32>(w), bitcast<f32>(g)));
    }
    let lo = to_half(perturbed(element(w, 0u), element(g, 0u)));
    let hi = to_half(perturbed(element(w, 1u), element(g, 1u)));
    return (hi << 16u) | lo;
}

// ---- scaled sums of squares ----
//
// A sum of squares of f32 values overflows f32 once an element passes 1.8e19 (its square passes
// f32's largest value), though the norm of any finite input is a finite f64. So, as BLAS's nrm2
// does, each sum is kept as q * 2^(2k): k is the largest binary exponent seen so far, and q adds
// the squares of x * 2^-k, each in [0, 4). Raising k rescales q by an exact power of two. Every
// multiplication here is by a power of two, so x * 2^-k is exact and q rounds as a plain f32 sum of
// values of the same size would; the host adds the partials in f64, where 2^(2k) fits.

const MIN_EXP: i32 = -126;

// 2^n as f32, for n in [-126, 127] (a normal number built from its exponent bits).
fn pow2(n: i32) -> f32 {
    return bitcast<f32>(u32(n + 127) << 23u);
}

// q * 2^d for d <= 0; a term below 2^-60 of the sum it joins is dropped (it cannot change an f32).
fn shrink(q: f32, d: i32) -> f32 {
    return select(0.0, q * pow2(max(d, -60)), d >= -60);
}

// The binary exponent of x (x = 1.m * 2^e), with subnormals and zero at MIN_EXP.
fn exponent(x: f32) -> i32 {
    return max(i32((bitcast<u32>(x) >> 23u) & 0xffu) - 127, MIN_EXP);
}

// Adds x^2 to the scaled sum s = (q, k as f32 bits).
fn ssq_add(s: vec2<f32>, x: f32) -> vec2<f32> {
    var q = s.x;
    var k = bitcast<i32>(s.y);
    let e = exponent(x);
    if (e > k) {
        q = shrink(q, 2 * (k - e));
        k = e;
    }
    // x * 2^-k in two exact steps, each exponent in [-64, 63].
    let half = k >> 1;
    let y = (x * pow2(-half)) * pow2(half - k);
    return vec2<f32>(q + y * y, bitcast<f32>(k));
}

fn ssq_zero() -> vec2<f32> {
    return vec2<f32>(0.0, bitcast<f32>(MIN_EXP));
}

fn ssq_merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let ka = bitcast<i32>(a.y);
    let kb = bitcast<i32>(b.y);
    let k = max(ka, kb);
    return vec2<f32>(shrink(a.x, 2 * (ka - k)) + shrink(b.x, 2 * (kb - k)), bitcast<f32>(k));
}

// (T_w g)^2 added over the elements of a word, and whether any input was non-finite.
fn norm_word(s_in: vec2<f32>, w: u32, g: u32, bad: ptr<function, bool>) -> vec2<f32> {
    var s = s_in;
    for (var h = 0u; h < per_word(); h++) {
        s = ssq_add(s, element(g, h) * t_w(element(w, h)));
        if (non_finite(g, h) || (ADAPTIVE && non_finite(w, h))) {
            *bad = true;
        }
    }
    return s;
}

// ---- the norm pass: per-invocation f32 sums, then a fixed tree per workgroup ----

@compute @workgroup_size(256)
fn ascent_norm(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let stride = nwg.x * WORKGROUP;
    var sum = ssq_zero();
    var bad = false;
    let pre = PRECOND && window.pre_bias2_sqrt > 0.0;
    for (var i = wid.x * WORKGROUP + lid; i < window.quads; i += stride) {
        let g = grad[i];
        if (pre) {
            let pw = per_word();
            for (var k = 0u; k < 4u; k++) {
                for (var h = 0u; h < pw; h++) {
                    let e = k * pw + h;
                    let v = state_v[pw * i + e / 4u][e % 4u];
                    sum = ssq_add(sum, preconditioned(element(g[k], h), v));
                    bad = bad || non_finite(g[k], h);
                }
            }
            continue;
        }
        var w = vec4<u32>(0u);
        if (ADAPTIVE) {
            w = param[i];
        }
        sum = norm_word(sum, w.x, g.x, &bad);
        sum = norm_word(sum, w.y, g.y, &bad);
        sum = norm_word(sum, w.z, g.z, &bad);
        sum = norm_word(sum, w.w, g.w, &bad);
    }
    finish_reduction(lid, wid.x, sum, 0.0, u32(bad));
}

// P g for one element, with P = 1 / (sqrt(v_hat) + eps) in the order of AdamW's denominator.
fn preconditioned(g: f32, v: f32) -> f32 {
    return g / (sqrt(v) / window.pre_bias2_sqrt + step.adam_eps);
}

// The fixed tree of a workgroup's reduction: this invocation's sums in, the workgroup's partial
// (scaled sum of squares, dot product, flag, scale exponent) out to its slot. Called from uniform
// control flow.
fn finish_reduction(lid: u32, group: u32, sum: vec2<f32>, dot_sum: f32, bad: u32) {
    scratch[lid] = sum.x;
    scratch_exp[lid] = bitcast<i32>(sum.y);
    scratch_dot[lid] = dot_sum;
    scratch_flag[lid] = bad;
    workgroupBarrier();
    for (var width = WORKGROUP / 2u; width > 0u; width >>= 1u) {
        if (lid < width) {
            let merged = ssq_merge(vec2<f32>(scratch[lid], bitcast<f32>(scratch_exp[lid])),
                                   vec2<f32>(scratch[lid + width], bitcast<f32>(scratch_exp[lid + width])));
            scratch[lid] = merged.x;
            scratch_exp[lid] = bitcast<i32>(merged.y);
            scratch_dot[lid] += scratch_dot[lid + width];
            scratch_flag[lid] |= scratch_flag[lid + width];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        partials[window.slot + group] = vec4<u32>(bitcast<u32>(scratch[0]), bitcast<u32>(scratch_dot[0]),
                                                  scratch_flag[0], bitcast<u32>(scratch_exp[0]));
    }
}

// ---- the perturbation pass: save w, then w <- w + e(w) ----

@compute @workgroup_size(256)
fn perturb(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * WORKGROUP;
    for (var i = gid.x; i < window.quads; i += stride) {
        let w = param[i];
        let g = grad[i];
        backup[i] = w;
        if (KEEP_FIRST) {
            first_grad[i] = g;
        }
        if (PRECOND && window.pre_bias2_sqrt > 0.0) {
            let pw = per_word();
            var out = vec4<u32>(0u);
            for (var k = 0u; k < 4u; k++) {
                var word = 0u;
                for (var h = 0u; h < pw; h++) {
                    let e = k * pw + h;
                    let v = state_v[pw * i + e / 4u][e % 4u];
                    let r = element(w[k], h) + preconditioned(element(g[k], h), v) * step.scale;
                    word = with_element(word, h, r);
                }
                out[k] = word;
            }
            param[i] = out;
            continue;
        }
        param[i] = vec4<u32>(perturbed_word(w.x, g.x), perturbed_word(w.y, g.y),
                             perturbed_word(w.z, g.z), perturbed_word(w.w, g.w));
    }
}

// ---- the restore pass: w <- the saved bits ----

@compute @workgroup_size(256)
fn restore(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * WORKGROUP;
    for (var i = gid.x; i < window.quads; i += stride) {
        param[i] = backup[i];
    }
}

// ---- after a non-finite norm: the first bad element of the window ----

@compute @workgroup_size(256)
fn locate_non_finite(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * WORKGROUP;
    for (var i = gid.x; i < window.quads; i += stride) {
        let g = grad[i];
        let w = param[i];
        for (var k = 0u; k < 4u; k++) {
            for (var h = 0u; h < per_word(); h++) {
                if (non_finite(g[k], h) || (ADAPTIVE && non_finite(w[k], h))) {
                    atomicMin(&first_bad[window.index], (4u * i + k) * per_word() + h);
                }
            }
        }
    }
}

// ---- the second step with a base optimizer ----

// ||g'||^2 and g.g' (GSAM) per workgroup, with the non-finite flag of g'.
@compute @workgroup_size(256)
fn second_reduce(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let stride = nwg.x * WORKGROUP;
    var sum = ssq_zero();
    var dot_sum = 0.0;
    var bad = 0u;
    for (var i = wid.x * WORKGROUP + lid; i < window.quads; i += stride) {
        let g2 = grad[i];
        var g1 = vec4<u32>(0u);
        if (KEEP_FIRST) {
            g1 = first_grad[i];
        }
        for (var k = 0u; k < 4u; k++) {
            for (var h = 0u; h < per_word(); h++) {
                let x = element(g2[k], h);
                sum = ssq_add(sum, x);
                if (KEEP_FIRST) {
                    dot_sum += element(g1[k], h) * x;
                }
                bad |= u32(non_finite(g2[k], h));
            }
        }
    }
    finish_reduction(lid, wid.x, sum, dot_sum, bad);
}

fn direction(g2: f32, g1: f32) -> f32 {
    return step.a * g2 - step.b * g1;
}

// One element of the base update, in the order of src/math.rs, SGD's cases folded into coefficients (see
// src/math.rs); m and v are its state.
fn base_update(w_in: f32, d_in: f32, m: ptr<function, f32>, v: ptr<function, f32>) -> f32 {
    if (BASE == 2u) {
        let w = w_in * window.decay;
        *m = step.beta1 * *m + step.one_minus_beta1 * d_in;
        *v = step.beta2 * *v + step.one_minus_beta2 * (d_in * d_in);
        let denom = sqrt(*v) / window.bias2_sqrt + step.adam_eps;
        // adam_eps = 0: denom is 0 only where m is 0 too; the step is 0 there, not 0/0.
        return w - window.step_size * select(0.0, *m / denom, denom > 0.0);
    }
    let d = d_in + window.weight_decay * w_in;
    *m = window.keep * *m + window.take * d;
    return w_in - window.lr * (step.nd * d + step.nb * *m);
}

// The restore fused with the update: w from the backup, state read and written once.
@compute @workgroup_size(256)
fn update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * WORKGROUP;
    let pw = per_word();
    for (var i = gid.x; i < window.quads; i += stride) {
        let g2 = grad[i];
        var g1 = vec4<u32>(0u);
        if (GSAM) {
            g1 = first_grad[i];
        }
        // The directions of the quad's elements, in element order e = k * pw + h.
        var d = array<f32, 8>();
        for (var k = 0u; k < 4u; k++) {
            for (var h = 0u; h < pw; h++) {
                d[k * pw + h] = direction(element(g2[k], h), element(g1[k], h));
            }
        }
        update_quad(i, backup[i], d);
    }
}

// The base update of quad i from its weights `wq` (the restored bits, or the weights in place)
// and its elements' directions: the state (and master weights) read and written once, the new
// weights into param.
fn update_quad(i: u32, wq: vec4<u32>, d: array<f32, 8>) {
    let has_m = MOMENTUM || BASE == 2u;
    let pw = per_word();
    // pw vec4s of state per quad: four elements each.
    var m = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    var v = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    var master = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var q = 0u; q < pw; q++) {
        if (has_m) {
            m[q] = state_m[pw * i + q];
        }
        if (BASE == 2u) {
            v[q] = state_v[pw * i + q];
        }
        if (MASTER) {
            master[q] = master_at(i, q);
        }
    }
    var out = vec4<u32>(0u);
    for (var k = 0u; k < 4u; k++) {
        var word = 0u;
        for (var h = 0u; h < pw; h++) {
            let e = k * pw + h;
            var mk = m[e / 4u][e % 4u];
            var vk = v[e / 4u][e % 4u];
            var w = element(wq[k], h);
            if (MASTER && window.fresh == 0u) {
                w = master[e / 4u][e % 4u];
            }
            let r = base_update(w, d[e], &mk, &vk);
            if (MASTER) {
                master[e / 4u][e % 4u] = r;
            }
            m[e / 4u][e % 4u] = mk;
            v[e / 4u][e % 4u] = vk;
            word = with_element(word, h, r);
        }
        out[k] = word;
    }
    param[i] = out;
    for (var q = 0u; q < pw; q++) {
        if (has_m) {
            state_m[pw * i + q] = m[q];
        }
        if (BASE == 2u) {
            state_v[pw * i + q] = v[q];
        }
        if (MASTER) {
            partials[pw * i + q] = bitcast<vec4<u32>>(master[q]);
        }
    }
}

// The f32 master weights of quad i, vec4 q (binding 3 in the update passes of a master arena).
fn master_at(i: u32, q: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(partials[per_word() * i + q]);
}

// ---- step schedules ----
//
// Element e of a quad (e = k * pw + h: word k, half h) has its f32 state at vec4 pw*i + e/4,
// lane e%4; g_v is laid out the same way, in binding 2 for these passes.

fn look_at(i: u32, q: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(backup[per_word() * i + q]);
}

// The g_v of quad i, its per_word() vec4s (the rest zero).
fn look_quad(i: u32) -> array<vec4<f32>, 2> {
    var gv = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var q = 0u; q < per_word(); q++) {
        gv[q] = look_at(i, q);
    }
    return gv;
}

// A single-gradient step: w read in place (nothing was perturbed), direction a*g - b*g_v (b is
// minus LookSAM's reuse coefficient; g_v read only when LOOK), the state updated in place.
@compute @workgroup_size(256)
fn update_single(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * WORKGROUP;
    let pw = per_word();
    for (var i = gid.x; i < window.quads; i += stride) {
        let g = grad[i];
        var gv = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
        if (LOOK) {
            gv = look_quad(i);
        }
        var d = array<f32, 8>();
        for (var k = 0u; k < 4u; k++) {
            for (var h = 0u; h < pw; h++) {
                let e = k * pw + h;
                d[e] = step.a * element(g[k], h);
                if (LOOK) {
                    d[e] = direction(element(g[k], h), gv[e / 4u][e % 4u]);
                }
            }
        }
        update_quad(i, param[i], d);
    }
}

// LookSAM on a SAM step: g_v = g' - c*g (c = step.b = g.g'/||g||^2) into binding 2, and the
// workgroup's ||g_v||^2 as a scaled sum.
@compute @workgroup_size(256)
fn look_store(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let stride = nwg.x * WORKGROUP;
    let pw = per_word();
    var sum = ssq_zero();
    for (var i = wid.x * WORKGROUP + lid; i < window.quads; i += stride) {
        let g2 = grad[i];
        let g1 = first_grad[i];
        for (var q = 0u; q < pw; q++) {
            var out = vec4<f32>(0.0);
            for (var j = 0u; j < 4u; j++) {
                let e = 4u * q + j;
                let x = element(g2[e / pw], e % pw) - step.b * element(g1[e / pw], e % pw);
                out[j] = x;
                sum = ssq_add(sum, x);
            }
            backup[pw * i + q] = bitcast<vec4<u32>>(out);
        }
    }
    finish_reduction(lid, wid.x, sum, 0.0, 0u);
}

// LookSAM without a built-in base, on a single-gradient step: g <- g + c*g_v (c = step.b) in the
// gradient buffer, rounded to its dtype, for the host's optimizer.
@compute @workgroup_size(256)
fn look_direction(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * WORKGROUP;
    let pw = per_word();
    for (var i = gid.x; i < window.quads; i += stride) {
        let g = grad[i];
        let gv = look_quad(i);
        var out = vec4<u32>(0u);
        for (var k = 0u; k < 4u; k++) {
            var word = 0u;
            for (var h = 0u; h < pw; h++) {
                let e = k * pw + h;
                let r = element(g[k], h) + step.b * gv[e / 4u][e % 4u];
                word = with_element(word, h, r);
            }
            out[k] = word;
        }
        grad[i] = out;
    }
}
