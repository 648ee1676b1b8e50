"""
    SamOpt

Julia bindings for samopt, Sharpness-Aware Minimization as an embeddable optimizer, over `ccall`.
Works on Julia 1.5 and later. The library is found when the package loads: `ENV["SAMOPT_LIB"]`
when set (a path to `libsamopt.so`), else `libsamopt.so.1` (the C ABI this module speaks) and then
`libsamopt` from the system's library path (`make install`, `LD_LIBRARY_PATH`); loading fails with
a message saying what to set when neither is found, or when the library's ABI or `SamConfig`
layout differs from this module's.

    using SamOpt                     # after Pkg.develop(path = "bindings/julia") or Pkg.add
    opt = SamOptimizer(rho = 0.05)
    register!(opt, W, dW)            # any dense Float32/Float16 arrays (bf16: UInt16 with dtype = :bf16)
    if first_step!(opt) == :perturbed    # W -> W + e(W), after the gradient at W is in dW
        # ... the gradient at W + e(W) into dW (skipped on a :single_gradient step) ...
    end
    second_step!(opt)                # W restored (and updated with base = :sgd or :adamw)

Every failing call throws a `SamError` with the status and samopt's message; a failing call
changes nothing. Registered arrays are kept alive by the optimizer, which frees its handle when
garbage-collected (or at `close(opt)`).
"""
module SamOpt

using Libdl

export SamOptimizer, SamError, register!, first_step!, second_step!, grad_norm, tensor_count,
       step_count, isperturbed, set_lr!, lr, add_group!, set_group!, save_state, load_state!,
       save_state_file, load_state_file!, grad_sq_norm_local, first_step_with_norm!,
       set_allreduce!, accumulate_step!, set_rho!, rho, schedule_counts, rebind!, loss_scale

# The C ABI this module is written against (SAM_ABI_VERSION); the library's SONAME carries it.
const ABI_VERSION = UInt32(1)

# The library is opened by __init__ (not at precompile time, so SAMOPT_LIB is read in the session
# that loads the package); here its path and the address of every C function this module calls.
const LIBPATH = Ref{String}("")
const SYMBOLS = Dict{Symbol,Ptr{Cvoid}}()
const FUNCTIONS = (:sam_abi_version, :sam_config_layout, :sam_grad_norm, :sam_tensor_count,
                   :sam_step_count, :sam_is_perturbed, :sam_get_lr, :sam_state_size, :sam_get_rho,
                   :sam_get_loss_scale, :sam_accumulate_step, :sam_add_group, :sam_config_init,
                   :sam_create, :sam_destroy, :sam_first_step, :sam_first_step_with_norm,
                   :sam_grad_sq_norm_local, :sam_last_error, :sam_rebind_host,
                   :sam_register_host_ex, :sam_schedule_counts, :sam_second_step,
                   :sam_set_allreduce, :sam_set_lr, :sam_set_rho, :sam_set_tensor_group,
                   :sam_state_load, :sam_state_load_file, :sam_state_save, :sam_state_save_file,
                   :sam_status_string)

sym(name::Symbol) = SYMBOLS[name]

"""
    SamOpt.library_path()

The file of the samopt library this session loaded.
"""
library_path() = LIBPATH[]

function open_library()
    path = get(ENV, "SAMOPT_LIB", "")
    if !isempty(path)
        handle = try
            Libdl.dlopen(path)
        catch e
            error("SamOpt: cannot load ENV[\"SAMOPT_LIB\"] = \"$path\": $(sprint(showerror, e)). ",
                  "Set SAMOPT_LIB to the path of libsamopt.so (e.g. target/release/libsamopt.so after ",
                  "`cargo build --release`), or unset it to search the system's library path.")
        end
        return handle, path
    end
    for name in ("libsamopt.so.$(Int(ABI_VERSION))", "libsamopt")
        handle = Libdl.dlopen(name; throw_error = false)
        handle === nothing || return handle, Libdl.dlpath(handle)
    end
    error("SamOpt: libsamopt not found on the system's library path (looked for ",
          "libsamopt.so.$(Int(ABI_VERSION)) and libsamopt). Install it (`make install PREFIX=/usr/local` ",
          "in samopt's repository, then `ldconfig`), add its directory to LD_LIBRARY_PATH, or set ",
          "ENV[\"SAMOPT_LIB\"] to the library's path before `using SamOpt`.")
end

# SamStatus values used here.
const SAM_OK = Int32(0)
const SAM_STEP_SKIPPED = Int32(1)
const SAM_STEP_SINGLE_GRADIENT = Int32(2)
const SAM_ERR_INVALID_ARGUMENT = Int32(-2)

"""
    SamError(status, message)

A failed samopt call: `status` is the `SamStatus` number (negative), `message` samopt's text,
which names the argument and the value that were wrong.
"""
struct SamError <: Exception
    status::Int32
    message::String
end

Base.showerror(io::IO, e::SamError) = print(io, "SamError(", e.status, ", ",
    unsafe_string(ccall(sym(:sam_status_string), Cstring, (Int32,), e.status)), "): ", e.message)

function check(status::Int32)
    if status < 0
        throw(SamError(status, unsafe_string(ccall(sym(:sam_last_error), Cstring, ()))))
    end
    return status
end

# The C struct SamConfig, field for field (an isbits struct has the C layout). Not trusted: at load
# time check_config_layout compares every field's offset and size with what the library reports
# (sam_config_layout), and the tests require the same fields in the same order.
struct SamConfig
    struct_size::Csize_t
    rho::Cdouble
    eps::Cdouble
    eta::Cdouble
    norm_p::Cdouble
    adaptive::Bool
    backend::UInt32
    num_threads::UInt32
    adapter::Ptr{Cchar}
    base::UInt32
    lr::Cdouble
    momentum::Cdouble
    dampening::Cdouble
    nesterov::Bool
    weight_decay::Cdouble
    beta1::Cdouble
    beta2::Cdouble
    adam_eps::Cdouble
    max_grad_norm::Cdouble
    gsam_alpha::Cdouble
    schedule::UInt32
    schedule_k::UInt64
    schedule_p::Cdouble
    schedule_seed::UInt64
    looksam_alpha::Cdouble
    aesam_delta::Cdouble
    aesam_lambda1::Cdouble
    aesam_lambda2::Cdouble
    aesam_planned_steps::UInt64
    loss_scale::Cdouble
    loss_scale_growth::Cdouble
    loss_scale_backoff::Cdouble
    loss_scale_interval::UInt64
    master_weights::Bool
    preconditioned::Bool
end

# One entry of sam_config_layout.
struct SamConfigField
    name::Cstring
    offset::Csize_t
    size::Csize_t
end

"""
    SamOpt.config_layout()

The library's `SamConfig` fields as `(name, offset, size)` tuples, in declaration order
(`sam_config_layout`).
"""
function config_layout()
    n = Ref{Csize_t}(0)
    check(ccall(sym(:sam_config_layout), Int32, (Ptr{SamConfigField}, Csize_t, Ref{Csize_t}), C_NULL, 0, n))
    fields = Vector{SamConfigField}(undef, n[])
    check(ccall(sym(:sam_config_layout), Int32, (Ptr{SamConfigField}, Csize_t, Ref{Csize_t}), fields, length(fields), n))
    return [(unsafe_string(f.name), Int(f.offset), Int(f.size)) for f in fields]
end

# Every field of this module's SamConfig must be where the library puts it, with its size. (A
# newer library may have more fields: sam_config_init and sam_create accept this shorter layout.)
function check_config_layout()
    library = Dict(name => (offset, size) for (name, offset, size) in config_layout())
    for i in 1:fieldcount(SamConfig)
        name = String(fieldname(SamConfig, i))
        ours = (Int(fieldoffset(SamConfig, i)), sizeof(fieldtype(SamConfig, i)))
        theirs = get(library, name, nothing)
        theirs === nothing && error("SamOpt: SamConfig.$name is not a field of $(LIBPATH[])'s SamConfig")
        theirs == ours || error("SamOpt: SamConfig.$name is at byte $(ours[1]) ($(ours[2]) bytes) in SamOpt.jl ",
                                "but at byte $(theirs[1]) ($(theirs[2]) bytes) in $(LIBPATH[])")
    end
    return nothing
end

const BACKENDS = Dict(:auto => UInt32(0), :cpu => UInt32(1), :gpu => UInt32(2))
const BASES = Dict(:none => UInt32(0), :sgd => UInt32(1), :adamw => UInt32(2))
const DTYPES = Dict(:f32 => UInt32(0), :f16 => UInt32(1), :bf16 => UInt32(2))
const SCHEDULES = Dict(:every => UInt32(0), :interval => UInt32(1), :random => UInt32(2), :looksam => UInt32(3),
                       :aesam => UInt32(4))

"""
    SamOptimizer(; rho = 0.05, adaptive = false, eta = 0.0, norm_p = 2.0, backend = :auto,
                   threads = 0, base = :none, lr = 1e-3, momentum = 0.0, dampening = 0.0,
                   nesterov = false, weight_decay = NaN, beta1 = 0.9, beta2 = 0.999,
                   adam_eps = 1e-8, max_grad_norm = 0.0, gsam_alpha = 0.0, schedule = :every,
                   schedule_k = 10, schedule_p = 0.5, schedule_seed = 0, looksam_alpha = 0.7,
                   aesam_delta = 0.9, aesam_lambda1 = -1.0, aesam_lambda2 = 1.0,
                   aesam_planned_steps = 0, loss_scale = 0.0, loss_scale_growth = 2.0,
                   loss_scale_backoff = 0.5, loss_scale_interval = 2000, master_weights = false,
                   preconditioned = false)

Creates an optimizer (`sam_create`). `backend` is `:auto`, `:cpu` or `:gpu`; `base` is `:none`
(the second step only restores; run your own optimizer after it), `:sgd` or `:adamw` (PyTorch's
semantics, fused with the restore). `weight_decay = NaN` takes PyTorch's default for the base;
`norm_p = Inf` is the sign perturbation; `max_grad_norm` clips the second gradient (0: off);
`gsam_alpha` turns on GSAM (0: off). `schedule` is `:every` (plain SAM), `:interval`
(SAM every `schedule_k` steps), `:random` (SAM with probability `schedule_p`, seeded by
`schedule_seed`), `:looksam` (every `schedule_k` steps, reusing the orthogonal direction with
weight `looksam_alpha`; without a built-in base, register the gradients with
`grad_writable = true`) or `:aesam` (from the gradient norm's moving statistics; needs
`aesam_planned_steps`): on the other steps `first_step!` returns `:single_gradient`.
`loss_scale` (0: off; 65536.0 is GradScaler's) turns on loss scaling: multiply the loss by
`loss_scale(opt)` before each backward; an overflow makes `first_step!`/`second_step!` return
`:skipped` with nothing changed and the scale lowered. `master_weights = true` keeps f32 master
copies of Float16/bf16 weights (needs a base); `preconditioned = true` (base `:adamw`) perturbs
along AdamW's preconditioned gradient.
"""
mutable struct SamOptimizer
    handle::Ptr{Cvoid}
    # The registered arrays: kept here so the garbage collector cannot free them under samopt.
    arrays::Vector{Any}
    # The all-reduce function of set_allreduce!, kept alive while samopt holds a pointer to it.
    allreduce::Any

    function SamOptimizer(; rho = 0.05, adaptive = false, eta = 0.0, norm_p = 2.0, backend = :auto,
                          threads = 0, base = :none, lr = 1e-3, momentum = 0.0, dampening = 0.0,
                          nesterov = false, weight_decay = NaN, beta1 = 0.9, beta2 = 0.999,
                          adam_eps = 1e-8, max_grad_norm = 0.0, gsam_alpha = 0.0, schedule = :every,
                          schedule_k = 10, schedule_p = 0.5, schedule_seed = 0, looksam_alpha = 0.7,
                          aesam_delta = 0.9, aesam_lambda1 = -1.0, aesam_lambda2 = 1.0,
                          aesam_planned_steps = 0, loss_scale = 0.0, loss_scale_growth = 2.0,
                          loss_scale_backoff = 0.5, loss_scale_interval = 2000, master_weights = false,
                          preconditioned = false)
        haskey(BACKENDS, backend) || throw(ArgumentError("backend = $backend: use :auto, :cpu or :gpu"))
        haskey(BASES, base) || throw(ArgumentError("base = $base: use :none, :sgd or :adamw"))
        haskey(SCHEDULES, schedule) ||
            throw(ArgumentError("schedule = $schedule: use :every, :interval, :random, :looksam or :aesam"))
        # The defaults in this module's layout of SamConfig (sam_config_init takes its size; the
        # exported sam_config_default keeps the first released layout for old programs).
        r = Ref{SamConfig}()
        check(ccall(sym(:sam_config_init), Int32, (Ref{SamConfig}, Csize_t), r, sizeof(SamConfig)))
        d = r[]
        config = SamConfig(d.struct_size, rho, d.eps, eta, norm_p, adaptive, BACKENDS[backend],
                           threads, C_NULL, BASES[base], lr, momentum, dampening, nesterov,
                           weight_decay, beta1, beta2, adam_eps, max_grad_norm, gsam_alpha,
                           SCHEDULES[schedule], schedule_k, schedule_p, schedule_seed, looksam_alpha,
                           aesam_delta, aesam_lambda1, aesam_lambda2, aesam_planned_steps,
                           loss_scale, loss_scale_growth, loss_scale_backoff, loss_scale_interval,
                           master_weights, preconditioned)
        out = Ref{Ptr{Cvoid}}(C_NULL)
        check(ccall(sym(:sam_create), Int32, (Ref{SamConfig}, Ref{Ptr{Cvoid}}), config, out))
        opt = new(out[], Any[], nothing)
        finalizer(close, opt)
        return opt
    end
end

"""
    close(opt::SamOptimizer)

Frees the handle now (`sam_destroy`); the garbage collector does it otherwise. Idempotent.
"""
function Base.close(opt::SamOptimizer)
    if opt.handle != C_NULL
        ccall(sym(:sam_destroy), Cvoid, (Ptr{Cvoid},), opt.handle)
        opt.handle = C_NULL
        empty!(opt.arrays)
    end
    return nothing
end

function handle(opt::SamOptimizer)
    opt.handle == C_NULL && throw(ArgumentError("the SamOptimizer was closed"))
    return opt.handle
end

dtype_of(::Type{Float32}, dtype) = dtype === nothing ? :f32 : dtype
dtype_of(::Type{Float16}, dtype) = dtype === nothing ? :f16 : dtype
dtype_of(::Type{UInt16}, dtype) = dtype === nothing ?
    throw(ArgumentError("UInt16 arrays need dtype = :bf16 or :f16")) : dtype
dtype_of(::Type{T}, dtype) where {T} = throw(ArgumentError("element type $T: use Float32, Float16, or UInt16 with dtype = :bf16"))

function iscontiguous(a::AbstractArray)
    a isa Array && return true
    try
        return strides(a) == Base.size_to_strides(1, size(a)...)
    catch
        return false
    end
end

"""
    register!(opt, param, grad; dtype = nothing, grad_writable = false) -> Int

Registers a parameter array and its gradient array (`sam_register_host_ex`): dense arrays of the
same size and element type, `Float32` or `Float16` (or `UInt16` holding bf16 bits, with
`dtype = :bf16`), with contiguous memory (checked). samopt rewrites `param` in place at every step
and only reads `grad`, unless `grad_writable = true` lets it write there without a built-in base:
the mean gradient of per-shard SAM (`accumulate_step!`), or LookSAM's direction on its
single-gradient steps. The optimizer keeps both alive. Returns
the tensor's id (from 0).
"""
function register!(opt::SamOptimizer, param::AbstractArray{T}, grad::AbstractArray{T};
                   dtype = nothing, grad_writable::Bool = false) where {T}
    size(param) == size(grad) || throw(ArgumentError("param is $(size(param)) but grad is $(size(grad))"))
    (iscontiguous(param) && iscontiguous(grad)) ||
        throw(ArgumentError("param and grad must have contiguous memory (got $(typeof(param)))"))
    dt = dtype_of(T, dtype)
    haskey(DTYPES, dt) || throw(ArgumentError("dtype = $dt: use :f32, :f16 or :bf16"))
    id = Ref{UInt32}(0)
    GC.@preserve param grad begin
        # sam_register_host_ex with SAM_REGISTER_GRAD_WRITABLE (1) when the gradient may be written.
        check(ccall(sym(:sam_register_host_ex), Int32,
                    (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Csize_t, UInt32, UInt32, Ref{UInt32}),
                    handle(opt), pointer(param), pointer(grad), length(param), DTYPES[dt],
                    UInt32(grad_writable), id))
    end
    push!(opt.arrays, param, grad)
    return Int(id[])
end

"""
    rebind!(opt, id, param, grad)

Tensor `id` (from `register!`) now lives in `param` and `grad`, new arrays of the same size and
element type (`sam_rebind_host`); its optimizer state is kept. `param` must hold the weights. For
code that allocates new arrays between steps. The optimizer keeps the new arrays alive instead of
the old ones.
"""
function rebind!(opt::SamOptimizer, id::Integer, param::AbstractArray{T}, grad::AbstractArray{T}) where {T}
    size(param) == size(grad) || throw(ArgumentError("param is $(size(param)) but grad is $(size(grad))"))
    (iscontiguous(param) && iscontiguous(grad)) ||
        throw(ArgumentError("param and grad must have contiguous memory (got $(typeof(param)))"))
    0 <= id && 2id + 2 <= length(opt.arrays) || throw(ArgumentError("id = $id: no such tensor"))
    old = opt.arrays[2id+1]
    (eltype(old) == T && length(old) == length(param)) ||
        throw(ArgumentError("tensor $id holds $(length(old)) $(eltype(old)); got $(length(param)) $T"))
    GC.@preserve param grad begin
        check(ccall(sym(:sam_rebind_host), Int32, (Ptr{Cvoid}, UInt32, Ptr{Cvoid}, Ptr{Cvoid}),
                    handle(opt), id, pointer(param), pointer(grad)))
    end
    opt.arrays[2id+1] = param
    opt.arrays[2id+2] = grad
    return nothing
end

"""
    first_step!(opt) -> Symbol

The ascent (`sam_first_step`): one global gradient norm, then every parameter moved to
`w + e(w)`: `:perturbed` (compute the gradient there, then `second_step!`), or
`:single_gradient` when the schedule makes this a single-gradient step (nothing moved: skip the
second forward/backward and call `second_step!` now), or `:skipped` when loss scaling found an
overflow (nothing moved, scale lowered; skip the second forward/backward, `second_step!` ends it). Throws a `SamError` (status -4) with
nothing changed on NaN or Inf in a gradient.
"""
first_step!(opt::SamOptimizer) = first_symbol(check(ccall(sym(:sam_first_step), Int32, (Ptr{Cvoid},), handle(opt))))

first_symbol(s::Int32) = s == SAM_STEP_SINGLE_GRADIENT ? :single_gradient : s == SAM_STEP_SKIPPED ? :skipped : :perturbed

"""
    second_step!(opt) -> Symbol

Restores every parameter exactly (and, with a built-in base optimizer, updates it):
`:done`, or `:skipped` when a non-finite second gradient made samopt skip the update.
"""
function second_step!(opt::SamOptimizer)
    s = check(ccall(sym(:sam_second_step), Int32, (Ptr{Cvoid},), handle(opt)))
    return s == SAM_STEP_SKIPPED ? :skipped : :done
end

# `sam_*` calls that store one value through an output pointer, each its own method (the value's
# type is fixed per method, so each ccall is compiled for it).
for (name, cname, T) in [(:raw_grad_norm, :sam_grad_norm, Cdouble), (:raw_tensor_count, :sam_tensor_count, Csize_t),
                         (:raw_step_count, :sam_step_count, UInt64), (:raw_perturbed, :sam_is_perturbed, Bool),
                         (:raw_lr, :sam_get_lr, Cdouble), (:raw_state_size, :sam_state_size, Csize_t),
                         (:raw_rho, :sam_get_rho, Cdouble), (:raw_loss_scale, :sam_get_loss_scale, Cdouble)]
    @eval function $name(opt::SamOptimizer)
        out = Ref{$T}(zero($T))
        check(ccall(sym($(QuoteNode(cname))), Int32, (Ptr{Cvoid}, Ref{$T}), handle(opt), out))
        return out[]
    end
end

"The gradient norm the last first step used (`sam_grad_norm`)."
grad_norm(opt::SamOptimizer) = raw_grad_norm(opt)
"Number of registered tensors."
tensor_count(opt::SamOptimizer) = Int(raw_tensor_count(opt))
"Completed steps, SAM and single-gradient (skipped ones excluded)."
step_count(opt::SamOptimizer) = Int(raw_step_count(opt))
"Whether the weights are perturbed (between the two steps)."
isperturbed(opt::SamOptimizer) = raw_perturbed(opt)
"The base optimizer's learning rate."
lr(opt::SamOptimizer) = raw_lr(opt)

"The loss scale to multiply the next loss by (1.0 without loss scaling; `sam_get_loss_scale`)."
loss_scale(opt::SamOptimizer) = raw_loss_scale(opt)

"The current rho (`sam_get_rho`)."
rho(opt::SamOptimizer) = raw_rho(opt)

"Sets rho from the next first step on (`sam_set_rho`), for a rho schedule."
set_rho!(opt::SamOptimizer, rho::Real) =
    (check(ccall(sym(:sam_set_rho), Int32, (Ptr{Cvoid}, Cdouble), handle(opt), rho)); nothing)

"""
    schedule_counts(opt) -> (sam, single)

Completed SAM steps and single-gradient steps (`sam_schedule_counts`); gradient evaluations so
far are `2sam + single`.
"""
function schedule_counts(opt::SamOptimizer)
    sam, single = Ref{UInt64}(0), Ref{UInt64}(0)
    check(ccall(sym(:sam_schedule_counts), Int32, (Ptr{Cvoid}, Ref{UInt64}, Ref{UInt64}),
                handle(opt), sam, single))
    return (Int(sam[]), Int(single[]))
end

"Sets the base optimizer's learning rate from the next second step on (`sam_set_lr`)."
set_lr!(opt::SamOptimizer, lr::Real) =
    (check(ccall(sym(:sam_set_lr), Int32, (Ptr{Cvoid}, Cdouble), handle(opt), lr)); nothing)

"""
    add_group!(opt, lr_scale; weight_decay = NaN) -> Int

A parameter group with its learning-rate scale and weight decay (NaN: group 0's).
"""
function add_group!(opt::SamOptimizer, lr_scale::Real; weight_decay::Real = NaN)
    g = Ref{UInt32}(0)
    check(ccall(sym(:sam_add_group), Int32, (Ptr{Cvoid}, Cdouble, Cdouble, Ref{UInt32}),
                handle(opt), lr_scale, weight_decay, g))
    return Int(g[])
end

"Moves tensor `id` into `group`."
set_group!(opt::SamOptimizer, id::Integer, group::Integer) =
    (check(ccall(sym(:sam_set_tensor_group), Int32, (Ptr{Cvoid}, UInt32, UInt32), handle(opt), id, group)); nothing)

"A checkpoint of the optimizer's state as bytes (`sam_state_save`; between steps)."
function save_state(opt::SamOptimizer)
    n = Int(raw_state_size(opt))
    bytes = Vector{UInt8}(undef, n)
    check(ccall(sym(:sam_state_save), Int32, (Ptr{Cvoid}, Ptr{UInt8}, Csize_t, Ptr{Csize_t}),
                handle(opt), bytes, n, C_NULL))
    return bytes
end

"Restores a checkpoint (`sam_state_load`); throws a `SamError` saying why a bad one is refused."
load_state!(opt::SamOptimizer, bytes::Vector{UInt8}) =
    (check(ccall(sym(:sam_state_load), Int32, (Ptr{Cvoid}, Ptr{UInt8}, Csize_t), handle(opt), bytes, length(bytes))); nothing)

"Writes a checkpoint to `path` (temporary file, then rename)."
save_state_file(opt::SamOptimizer, path::AbstractString) =
    (check(ccall(sym(:sam_state_save_file), Int32, (Ptr{Cvoid}, Cstring), handle(opt), path)); nothing)

"Restores a checkpoint from `path`."
load_state_file!(opt::SamOptimizer, path::AbstractString) =
    (check(ccall(sym(:sam_state_load_file), Int32, (Ptr{Cvoid}, Cstring), handle(opt), path)); nothing)

"""
    grad_sq_norm_local(opt) -> Float64

Parameters sharded across workers (ZeRO, FSDP, tensor parallelism), step 1 of 2: the squared
gradient norm over this worker's own shard (`sam_grad_sq_norm_local`). Sum it over the workers,
then `first_step_with_norm!(opt, sqrt(sum))`: the norm over all shards. (Replicated parameters
need none of this: average the gradients before `first_step!`.)
"""
function grad_sq_norm_local(opt::SamOptimizer)
    out = Ref{Cdouble}(0)
    check(ccall(sym(:sam_grad_sq_norm_local), Int32, (Ptr{Cvoid}, Ref{Cdouble}), handle(opt), out))
    return out[]
end

"Parameters sharded across workers, step 2 of 2: the ascent with the norm over all shards."
first_step_with_norm!(opt::SamOptimizer, global_norm::Real) =
    first_symbol(check(ccall(sym(:sam_first_step_with_norm), Int32, (Ptr{Cvoid}, Cdouble), handle(opt), global_norm)))

"""
    accumulate_step!(opt)

m-sharpness in one process (`sam_accumulate_step`): the batch cut into parts; after `first_step!` on
a part's gradient and the gradient at the perturbed weights, restores the weights and accumulates
that gradient; after the last part `second_step!` applies their mean: with a built-in base it steps
with it (the gradient arrays are only read); without one it writes the mean into the gradient
arrays for your optimizer, which needs every tensor registered with `grad_writable = true`.
"""
accumulate_step!(opt::SamOptimizer) =
    (check(ccall(sym(:sam_accumulate_step), Int32, (Ptr{Cvoid},), handle(opt))); nothing)

# The C callback: `user` is the Julia function, which sums `values` across workers in place.
function allreduce_trampoline(values::Ptr{Cdouble}, count::Csize_t, user::Ptr{Cvoid})::Int32
    f = unsafe_pointer_to_objref(user)
    try
        f(unsafe_wrap(Array, values, Int(count)))
        return Int32(0)
    catch
        return Int32(1)
    end
end

const TRAMPOLINE = Ref{Ptr{Cvoid}}(C_NULL)

"""
    set_allreduce!(opt, f)

Installs `f(values::Vector{Float64})`, which sums `values` in place across the workers (e.g. with
MPI.jl's `MPI.Allreduce!(values, +, comm)`): from then on `first_step!` sums the workers' squared
local norms and perturbs with the root, the norm over all shards when the parameters are sharded
across workers (each registers its own slice). Not for replicated parameters: average their
gradients before `first_step!` instead. `nothing` removes it. An exception in `f` fails the step
(status -10).
"""
function set_allreduce!(opt::SamOptimizer, f)
    if f === nothing
        check(ccall(sym(:sam_set_allreduce), Int32, (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}), handle(opt), C_NULL, C_NULL))
    else
        check(ccall(sym(:sam_set_allreduce), Int32, (Ptr{Cvoid}, Ptr{Cvoid}, Any), handle(opt), TRAMPOLINE[], f))
    end
    opt.allreduce = f
    return nothing
end

# Last in the module: the @cfunction needs allreduce_trampoline defined.
function __init__()
    handle, path = open_library()
    for name in FUNCTIONS
        p = Libdl.dlsym(handle, name; throw_error = false)
        p === nothing && error("SamOpt: $path has no function $name: it is older than this SamOpt.jl; ",
                               "install a newer samopt or point ENV[\"SAMOPT_LIB\"] at one")
        SYMBOLS[name] = p
    end
    LIBPATH[] = path
    abi = ccall(sym(:sam_abi_version), UInt32, ())
    abi == ABI_VERSION || error("SamOpt: $path implements C ABI $abi, this SamOpt.jl ABI $ABI_VERSION")
    check_config_layout()
    TRAMPOLINE[] = @cfunction(allreduce_trampoline, Int32, (Ptr{Cdouble}, Csize_t, Ptr{Cvoid}))
    return nothing
end

end # module
