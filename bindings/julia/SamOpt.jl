"""
    SamOpt

Julia bindings for samopt, Sharpness-Aware Minimization as an embeddable optimizer, over `ccall`.
Works on Julia 1.5 and later. The library is `ENV["SAMOPT_LIB"]` when set at load time (a path to
`libsamopt.so`), else `libsamopt` from the system's library path.

    include("bindings/julia/SamOpt.jl"); using .SamOpt
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

export SamOptimizer, SamError, register!, first_step!, second_step!, grad_norm, tensor_count,
       step_count, isperturbed, set_lr!, lr, add_group!, set_group!, save_state, load_state!,
       save_state_file, load_state_file!, grad_sq_norm_local, first_step_with_norm!,
       set_allreduce!, accumulate_step!, set_rho!, rho, schedule_counts, rebind!, loss_scale

const libsamopt = get(ENV, "SAMOPT_LIB", "libsamopt")

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
    unsafe_string(ccall((:sam_status_string, libsamopt), Cstring, (Int32,), e.status)), "): ", e.message)

function check(status::Int32)
    if status < 0
        throw(SamError(status, unsafe_string(ccall((:sam_last_error, libsamopt), Cstring, ()))))
    end
    return status
end

# The C struct SamConfig, field for field (an isbits struct has the C layout).
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
        check(ccall((:sam_config_init, libsamopt), Int32, (Ref{SamConfig}, Csize_t), r, sizeof(SamConfig)))
        d = r[]
        config = SamConfig(d.struct_size, rho, d.eps, eta, norm_p, adaptive, BACKENDS[backend],
                           threads, C_NULL, BASES[base], lr, momentum, dampening, nesterov,
                           weight_decay, beta1, beta2, adam_eps, max_grad_norm, gsam_alpha,
                           SCHEDULES[schedule], schedule_k, schedule_p, schedule_seed, looksam_alpha,
                           aesam_delta, aesam_lambda1, aesam_lambda2, aesam_planned_steps,
                           loss_scale, loss_scale_growth, loss_scale_backoff, loss_scale_interval,
                           master_weights, preconditioned)
        out = Ref{Ptr{Cvoid}}(C_NULL)
        check(ccall((:sam_create, libsamopt), Int32, (Ref{SamConfig}, Ref{Ptr{Cvoid}}), config, out))
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
        ccall((:sam_destroy, libsamopt), Cvoid, (Ptr{Cvoid},), opt.handle)
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
        check(ccall((:sam_register_host_ex, libsamopt), Int32,
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
        check(ccall((:sam_rebind_host, libsamopt), Int32, (Ptr{Cvoid}, UInt32, Ptr{Cvoid}, Ptr{Cvoid}),
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
first_step!(opt::SamOptimizer) = first_symbol(check(ccall((:sam_first_step, libsamopt), Int32, (Ptr{Cvoid},), handle(opt))))

first_symbol(s::Int32) = s == SAM_STEP_SINGLE_GRADIENT ? :single_gradient : s == SAM_STEP_SKIPPED ? :skipped : :perturbed

"""
    second_step!(opt) -> Symbol

Restores every parameter exactly (and, with a built-in base optimizer, updates it):
`:done`, or `:skipped` when a non-finite second gradient made samopt skip the update.
"""
function second_step!(opt::SamOptimizer)
    s = check(ccall((:sam_second_step, libsamopt), Int32, (Ptr{Cvoid},), handle(opt)))
    return s == SAM_STEP_SKIPPED ? :skipped : :done
end

# `sam_*` calls that store one value through an output pointer: ccall needs the C name as a
# constant, so each gets its own method.
for (name, cname, T) in [(:raw_grad_norm, :sam_grad_norm, Cdouble), (:raw_tensor_count, :sam_tensor_count, Csize_t),
                         (:raw_step_count, :sam_step_count, UInt64), (:raw_perturbed, :sam_is_perturbed, Bool),
                         (:raw_lr, :sam_get_lr, Cdouble), (:raw_state_size, :sam_state_size, Csize_t),
                         (:raw_rho, :sam_get_rho, Cdouble), (:raw_loss_scale, :sam_get_loss_scale, Cdouble)]
    @eval function $name(opt::SamOptimizer)
        out = Ref{$T}(zero($T))
        check(ccall(($(QuoteNode(cname)), libsamopt), Int32, (Ptr{Cvoid}, Ref{$T}), handle(opt), out))
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
    (check(ccall((:sam_set_rho, libsamopt), Int32, (Ptr{Cvoid}, Cdouble), handle(opt), rho)); nothing)

"""
    schedule_counts(opt) -> (sam, single)

Completed SAM steps and single-gradient steps (`sam_schedule_counts`); gradient evaluations so
far are `2sam + single`.
"""
function schedule_counts(opt::SamOptimizer)
    sam, single = Ref{UInt64}(0), Ref{UInt64}(0)
    check(ccall((:sam_schedule_counts, libsamopt), Int32, (Ptr{Cvoid}, Ref{UInt64}, Ref{UInt64}),
                handle(opt), sam, single))
    return (Int(sam[]), Int(single[]))
end

"Sets the base optimizer's learning rate from the next second step on (`sam_set_lr`)."
set_lr!(opt::SamOptimizer, lr::Real) =
    (check(ccall((:sam_set_lr, libsamopt), Int32, (Ptr{Cvoid}, Cdouble), handle(opt), lr)); nothing)

"""
    add_group!(opt, lr_scale; weight_decay = NaN) -> Int

A parameter group with its learning-rate scale and weight decay (NaN: group 0's).
"""
function add_group!(opt::SamOptimizer, lr_scale::Real; weight_decay::Real = NaN)
    g = Ref{UInt32}(0)
    check(ccall((:sam_add_group, libsamopt), Int32, (Ptr{Cvoid}, Cdouble, Cdouble, Ref{UInt32}),
                handle(opt), lr_scale, weight_decay, g))
    return Int(g[])
end

"Moves tensor `id` into `group`."
set_group!(opt::SamOptimizer, id::Integer, group::Integer) =
    (check(ccall((:sam_set_tensor_group, libsamopt), Int32, (Ptr{Cvoid}, UInt32, UInt32), handle(opt), id, group)); nothing)

"A checkpoint of the optimizer's state as bytes (`sam_state_save`; between steps)."
function save_state(opt::SamOptimizer)
    n = Int(raw_state_size(opt))
    bytes = Vector{UInt8}(undef, n)
    check(ccall((:sam_state_save, libsamopt), Int32, (Ptr{Cvoid}, Ptr{UInt8}, Csize_t, Ptr{Csize_t}),
                handle(opt), bytes, n, C_NULL))
    return bytes
end

"Restores a checkpoint (`sam_state_load`); throws a `SamError` saying why a bad one is refused."
load_state!(opt::SamOptimizer, bytes::Vector{UInt8}) =
    (check(ccall((:sam_state_load, libsamopt), Int32, (Ptr{Cvoid}, Ptr{UInt8}, Csize_t), handle(opt), bytes, length(bytes))); nothing)

"Writes a checkpoint to `path` (temporary file, then rename)."
save_state_file(opt::SamOptimizer, path::AbstractString) =
    (check(ccall((:sam_state_save_file, libsamopt), Int32, (Ptr{Cvoid}, Cstring), handle(opt), path)); nothing)

"Restores a checkpoint from `path`."
load_state_file!(opt::SamOptimizer, path::AbstractString) =
    (check(ccall((:sam_state_load_file, libsamopt), Int32, (Ptr{Cvoid}, Cstring), handle(opt), path)); nothing)

"""
    grad_sq_norm_local(opt) -> Float64

Parameters sharded across workers (ZeRO, FSDP, tensor parallelism), step 1 of 2: the squared
gradient norm over this worker's own shard (`sam_grad_sq_norm_local`). Sum it over the workers,
then `first_step_with_norm!(opt, sqrt(sum))`: the norm over all shards. (Replicated parameters
need none of this: average the gradients before `first_step!`.)
"""
function grad_sq_norm_local(opt::SamOptimizer)
    out = Ref{Cdouble}(0)
    check(ccall((:sam_grad_sq_norm_local, libsamopt), Int32, (Ptr{Cvoid}, Ref{Cdouble}), handle(opt), out))
    return out[]
end

"Parameters sharded across workers, step 2 of 2: the ascent with the norm over all shards."
first_step_with_norm!(opt::SamOptimizer, global_norm::Real) =
    first_symbol(check(ccall((:sam_first_step_with_norm, libsamopt), Int32, (Ptr{Cvoid}, Cdouble), handle(opt), global_norm)))

"""
    accumulate_step!(opt)

m-sharpness in one process (`sam_accumulate_step`): the batch cut into parts; after `first_step!` on
a part's gradient and the gradient at the perturbed weights, restores the weights and accumulates
that gradient; after the last part `second_step!` applies their mean: with a built-in base it steps
with it (the gradient arrays are only read); without one it writes the mean into the gradient
arrays for your optimizer, which needs every tensor registered with `grad_writable = true`.
"""
accumulate_step!(opt::SamOptimizer) =
    (check(ccall((:sam_accumulate_step, libsamopt), Int32, (Ptr{Cvoid},), handle(opt))); nothing)

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
__init__() = (TRAMPOLINE[] = @cfunction(allreduce_trampoline, Int32, (Ptr{Cdouble}, Csize_t, Ptr{Cvoid})))

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
        check(ccall((:sam_set_allreduce, libsamopt), Int32, (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}), handle(opt), C_NULL, C_NULL))
    else
        check(ccall((:sam_set_allreduce, libsamopt), Int32, (Ptr{Cvoid}, Ptr{Cvoid}, Any), handle(opt), TRAMPOLINE[], f))
    end
    opt.allreduce = f
    return nothing
end

end # module
