// SAM's two GPU passes over one window of one tensor: the ascent norm and the perturbation.
// (The restore is a buffer copy from the backup, recorded by the Rust side.)
//
// Every dtype is stored as u32 words: one f32, or two f16/bf16 halves (low half first). Half
// conversions are integer code, rounding to nearest even, so the bits do not depend on how a
// driver implements pack2x16float. The formulas mirror src/math.rs:
//   p = 2:    e = rho * T_w^2 * g / (||T_w g|| + eps) = ((T_w * T_w) * g) * scale
//   p = inf:  e = rho * T_w * sign(g)
// with T_w = |w| + eta under ASAM and 1 otherwise.

const WORKGROUP: u32 = 256u;
const DTYPE_F32: u32 = 0u;
const DTYPE_F16: u32 = 1u;

// One window: a range of one tensor's words that fits a storage binding.
struct Window {
    elems: u32,   // elements in this window
    words: u32,   // u32 words holding them
    slot: u32,    // first partial-sum slot of this window
    dtype: u32,   // 0 f32, 1 f16, 2 bf16
}

// The step: fixed once the global norm is known.
struct Step {
    scale: f32,     // rho / (n + eps), or rho for the sign perturbation
    eta: f32,
    adaptive: u32,
    sign: u32,
}

@group(0) @binding(0) var<storage, read_write> param: array<u32>;
@group(0) @binding(1) var<storage, read> grad: array<u32>;
@group(0) @binding(2) var<storage, read_write> backup: array<u32>;
// Per workgroup: (bits of the f32 partial sum of (T_w g)^2, non-finite flag).
@group(0) @binding(3) var<storage, read_write> partials: array<vec2<u32>>;
@group(0) @binding(4) var<uniform> window: Window;
@group(0) @binding(5) var<uniform> step: Step;

var<workgroup> scratch: array<f32, WORKGROUP>;
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
        // Subnormal or zero: let the f32 adder round, with a magic number that aligns the bits.
        o = bitcast<u32>(bitcast<f32>(f) + bitcast<f32>(0x3f000000u)) - 0x3f000000u;
    } else {
        let odd = (f >> 13u) & 1u;
        o = (f + 0xc8000fffu + odd) >> 13u;                       // rebias and round to nearest even
    }
    return o | sign;
}

fn bf16_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

fn f32_to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;                                // NaN stays a quiet NaN
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn half_to_f32(h: u32) -> f32 {
    if (window.dtype == DTYPE_F16) {
        return f16_to_f32(h);
    }
    return bf16_to_f32(h);
}

fn f32_to_half(x: f32) -> u32 {
    if (window.dtype == DTYPE_F16) {
        return f32_to_f16(x);
    }
    return f32_to_bf16(x);
}

fn half_non_finite(h: u32) -> bool {
    if (window.dtype == DTYPE_F16) {
        return (h & 0x7c00u) == 0x7c00u;
    }
    return (h & 0x7f80u) == 0x7f80u;
}

// ---- the SAM formulas ----

fn t_w(w: f32) -> f32 {
    return select(1.0, abs(w) + step.eta, step.adaptive != 0u);
}

fn perturbed(w: f32, g: f32) -> f32 {
    let t = t_w(w);
    var e: f32;
    if (step.sign != 0u) {
        e = step.scale * sign(g) * select(1.0, t, step.adaptive != 0u);
    } else {
        e = ((t * t) * g) * step.scale;
    }
    return w + e;
}

// ---- the norm pass: per-workgroup partial sums in f32, then a fixed tree ----

@compute @workgroup_size(256)
fn ascent_norm(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let stride = nwg.x * WORKGROUP;
    let adaptive = step.adaptive != 0u;
    var sum = 0.0;
    var bad = 0u;
    for (var i = wid.x * WORKGROUP + lid; i < window.words; i += stride) {
        let gw = grad[i];
        if (window.dtype == DTYPE_F32) {
            var x = bitcast<f32>(gw);
            bad |= u32((gw & 0x7f800000u) == 0x7f800000u);
            if (adaptive) {
                let ww = param[i];
                bad |= u32((ww & 0x7f800000u) == 0x7f800000u);
                x = x * t_w(bitcast<f32>(ww));
            }
            sum += x * x;
        } else {
            let ww = param[i];
            for (var h = 0u; h < 2u; h++) {
                if (2u * i + h < window.elems) {
                    let gh = (gw >> (16u * h)) & 0xffffu;
                    var x = half_to_f32(gh);
                    bad |= u32(half_non_finite(gh));
                    if (adaptive) {
                        let wh = (ww >> (16u * h)) & 0xffffu;
                        bad |= u32(half_non_finite(wh));
                        x = x * t_w(half_to_f32(wh));
                    }
                    sum += x * x;
                }
            }
        }
    }
    scratch[lid] = sum;
    scratch_flag[lid] = bad;
    workgroupBarrier();
    for (var half_width = WORKGROUP / 2u; half_width > 0u; half_width >>= 1u) {
        if (lid < half_width) {
            scratch[lid] += scratch[lid + half_width];
            scratch_flag[lid] |= scratch_flag[lid + half_width];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        partials[window.slot + wid.x] = vec2<u32>(bitcast<u32>(scratch[0]), scratch_flag[0]);
    }
}

// ---- the perturbation pass: save w, then w <- w + e(w), one word per invocation ----

@compute @workgroup_size(256)
fn perturb(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let stride = nwg.x * WORKGROUP;
    for (var i = gid.x; i < window.words; i += stride) {
        let ww = param[i];
        let gw = grad[i];
        backup[i] = ww;
        if (window.dtype == DTYPE_F32) {
            param[i] = bitcast<u32>(perturbed(bitcast<f32>(ww), bitcast<f32>(gw)));
        } else {
            let lo = f32_to_half(perturbed(half_to_f32(ww & 0xffffu), half_to_f32(gw & 0xffffu)));
            var hi = ww >> 16u; // the padding half after an odd length keeps its bits
            if (2u * i + 1u < window.elems) {
                hi = f32_to_half(perturbed(half_to_f32(ww >> 16u), half_to_f32(gw >> 16u)));
            }
            param[i] = (hi << 16u) | lo;
        }
    }
}

// ---- the restore pass: w <- the saved bits ----

@compute @workgroup_size(256)
fn restore(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let stride = nwg.x * WORKGROUP;
    for (var i = gid.x; i < window.words; i += stride) {
        param[i] = backup[i];
    }
}
