# The Julia package's tests: numbers against a Float64 reference computed here, errors, dtypes,
# contiguity checks, the base optimizer, checkpoints, the finalizer, how the library is found, and
# this module's SamConfig against the library's layout.
#   SAMOPT_LIB=target/release/libsamopt.so julia -e 'using Pkg; Pkg.develop(path = "bindings/julia"); Pkg.test("SamOpt")'
using Test
using SamOpt

# `using SamOpt` in a fresh Julia of this test environment, with `env` changed; returns
# (succeeded, output).
function load_in_subprocess(env::Dict)
    cmd = `$(Base.julia_cmd()) --startup-file=no --project=$(Base.active_project()) -e "using SamOpt; print(SamOpt.library_path())"`
    full = merge(Dict(k => v for (k, v) in ENV if !haskey(env, k)), filter(kv -> kv[2] !== nothing, env))
    out = IOBuffer()
    ok = success(pipeline(setenv(cmd, full); stdout = out, stderr = out))
    return ok, String(take!(out))
end

@testset "SamOpt.jl" begin
    @testset "the library and its SamConfig layout" begin
        @test isfile(SamOpt.library_path())
        # Every field of the Julia struct, in order, where the library has it (and no field the
        # library has is missing here: a field added to the C struct fails this test).
        layout = SamOpt.config_layout()
        @test [name for (name, _, _) in layout] == [String(n) for n in fieldnames(SamOpt.SamConfig)]
        @test [(o, s) for (_, o, s) in layout] ==
              [(Int(fieldoffset(SamOpt.SamConfig, i)), sizeof(fieldtype(SamOpt.SamConfig, i))) for i in 1:length(layout)]
        # A SAMOPT_LIB that does not load: an error that names the variable and the path.
        ok, out = load_in_subprocess(Dict("SAMOPT_LIB" => "/nonexistent/libsamopt.so"))
        @test !ok
        @test occursin("SAMOPT_LIB", out) && occursin("/nonexistent/libsamopt.so", out)
        # Without SAMOPT_LIB: found on the loader's path by its SONAME, libsamopt.so.1 (here a link
        # to the library under test, in a directory of its own).
        dir = mktempdir()
        symlink(SamOpt.library_path(), joinpath(dir, "libsamopt.so.1"))
        ld = join(filter(!isempty, [dir, get(ENV, "LD_LIBRARY_PATH", "")]), ":")
        ok, out = load_in_subprocess(Dict("SAMOPT_LIB" => nothing, "LD_LIBRARY_PATH" => ld))
        @test ok
        @test out == joinpath(dir, "libsamopt.so.1")
    end

    @testset "first and second step against Float64" begin
        W = Float32[sin(i) for i in 1:1000]
        dW = Float32[0.01 * cos(0.7i) for i in 1:1000]
        b = Float32[0.5, -0.5, 2.0]
        db = Float32[0.0, 3.0, -4.0]
        W0, b0 = copy(W), copy(b)
        opt = SamOptimizer(rho = 0.1, backend = :cpu)
        @test register!(opt, W, dW) == 0
        @test register!(opt, b, db) == 1
        @test tensor_count(opt) == 2
        n = sqrt(sum(Float64.(dW) .^ 2) + sum(Float64.(db) .^ 2))
        first_step!(opt)
        @test isperturbed(opt)
        @test isapprox(grad_norm(opt), n; rtol = 1e-12)
        @test maximum(abs.(Float64.(W) .- (Float64.(W0) .+ 0.1 .* Float64.(dW) ./ n))) < 1e-6
        @test isapprox(Float64(b[3]), 2.0 + 0.1 * -4.0 / n; atol = 1e-6)
        @test second_step!(opt) == :done
        @test W == W0 && b == b0
        @test step_count(opt) == 1
        close(opt)
        close(opt) # idempotent
    end

    @testset "matrices, Float16, bf16 bits, contiguous views" begin
        M = rand(Float32, 4, 5)
        dM = fill(Float32(0.5), 4, 5)
        H = Float16[1, 2, 3]
        dH = Float16[0.5, 0, 0]
        B = UInt16[0x3f80, 0x4000]          # bf16 1.0, 2.0
        dB = UInt16[0x3f00, 0x0000]         # bf16 0.5, 0.0
        V = zeros(Float32, 10)
        dV = zeros(Float32, 10)
        opt = SamOptimizer(rho = 0.5, backend = :cpu)
        register!(opt, M, dM)
        register!(opt, H, dH)
        register!(opt, B, dB; dtype = :bf16)
        register!(opt, view(V, 3:6), view(dV, 3:6))
        @test_throws ArgumentError register!(opt, view(V, 1:2:9), view(dV, 1:2:9))
        @test_throws ArgumentError register!(opt, zeros(Float64, 3), zeros(Float64, 3))
        @test_throws ArgumentError register!(opt, zeros(UInt16, 3), zeros(UInt16, 3))
        @test_throws ArgumentError register!(opt, zeros(Float32, 3), zeros(Float32, 4))
        M0, H0, B0 = copy(M), copy(H), copy(B)
        first_step!(opt)
        n = sqrt(20 * 0.25 + 0.25 + 0.25)
        @test isapprox(Float64(H[1]), 1 + 0.5 * 0.5 / n; atol = 1e-3)
        @test second_step!(opt) == :done
        @test M == M0 && H == H0 && B == B0
    end

    @testset "step schedules: LookSAM against Float64, single-gradient status" begin
        # LookSAM (k = 3, alpha 0.5) with the built-in SGD; the reference is written here.
        W = Float32[0.5, -1.0, 0.25, 2.0]
        dW = zeros(Float32, 4)
        ref = Float64.(W)
        gv = zeros(4)
        opt = SamOptimizer(rho = 0.1, backend = :cpu, base = :sgd, lr = 0.1, schedule = :looksam,
                           schedule_k = 3, looksam_alpha = 0.5)
        register!(opt, W, dW)
        for t in 0:6
            g1 = Float32[0.3sin(t + i) for i in 1:4]
            g2 = Float32[0.3cos(2t + i) for i in 1:4]
            dW .= g1
            s = first_step!(opt)
            @test s == (t % 3 == 0 ? :perturbed : :single_gradient)
            if s == :perturbed
                dW .= g2
                a, b = Float64.(g1), Float64.(g2)
                gv = b .- (sum(a .* b) / sum(a .^ 2)) .* a
                d = b
            else
                a = Float64.(g1)
                d = a .+ 0.5 * sqrt(sum(a .^ 2)) / sqrt(sum(gv .^ 2)) .* gv
            end
            @test second_step!(opt) == :done
            ref = Float64.(Float32.(ref .- 0.1 .* d))
            @test maximum(abs.(Float64.(W) .- ref)) < 1e-6
        end
        @test schedule_counts(opt) == (3, 4)
        @test step_count(opt) == 7
        set_rho!(opt, 0.2)
        @test rho(opt) == 0.2
        err = try
            SamOptimizer(schedule = :interval, schedule_k = 0)
        catch e
            e
        end
        @test err isa SamError && err.status == -2 && occursin("schedule_k = 0", err.message)
        @test_throws ArgumentError SamOptimizer(schedule = :sometimes)
        close(opt)

        # Rebinding to new arrays keeps the state: two runs, one moving every step, end equal.
        runs = map((false, true)) do moving
            W = Float32[0.5, -1.0, 0.25, 2.0]
            dW = zeros(Float32, 4)
            o = SamOptimizer(backend = :cpu, base = :sgd, lr = 0.1, momentum = 0.9)
            register!(o, W, dW)
            for t in 1:5
                if moving
                    W, dW = copy(W), zeros(Float32, 4)
                    rebind!(o, 0, W, dW)
                end
                dW .= Float32[0.1t, -0.2, 0.3, 0.05t]
                first_step!(o)
                dW .= Float32[0.2, 0.1t, -0.1, 0.3]
                second_step!(o)
            end
            state = save_state(o)
            close(o)
            (W, state)
        end
        @test runs[1] == runs[2]

        # Loss scaling: an overflow is :skipped twice, nothing moves, the scale halves.
        W = Float32[1, 2]
        dW = Float32[NaN, 0]
        o = SamOptimizer(backend = :cpu, base = :sgd, lr = 0.5, loss_scale = 256.0)
        register!(o, W, dW)
        @test first_step!(o) == :skipped
        @test second_step!(o) == :skipped
        @test W == Float32[1, 2] && loss_scale(o) == 128.0
        dW .= 128 .* Float32[0.25, 0.5]
        @test first_step!(o) == :perturbed
        dW .= 128 .* Float32[0.5, -0.25]
        @test second_step!(o) == :done
        @test W == Float32[1 - 0.5 * 0.5, 2 + 0.5 * 0.25]
        close(o)

        # Master weights: Float16 weights take 200 updates of 1e-5, far below half an ulp of 1.0;
        # with f32 copies they follow the Float64 reference within one Float16 rounding.
        for master in (false, true)
            H = Float16[1, 1]
            dH = zeros(Float16, 2)
            o = SamOptimizer(backend = :cpu, base = :sgd, lr = 1e-3, master_weights = master)
            register!(o, H, dH)
            for _ in 1:200
                dH .= Float16(0.01)
                first_step!(o)
                dH .= Float16(0.01)
                second_step!(o)
            end
            want = 1 - 200 * 1e-3 * Float64(Float16(0.01))
            if master
                @test abs(Float64(H[1]) - want) <= eps(Float16(want))
            else
                @test H == Float16[1, 1]
            end
            close(o)
        end
        @test_throws SamError SamOptimizer(preconditioned = true, base = :sgd)
        o = SamOptimizer(backend = :cpu, base = :adamw, preconditioned = true)
        close(o)
        o = SamOptimizer(backend = :cpu)
        register!(o, zeros(Float32, 4), zeros(Float32, 4))
        @test_throws ArgumentError rebind!(o, 0, zeros(Float32, 3), zeros(Float32, 3))
        @test_throws ArgumentError rebind!(o, 1, zeros(Float32, 4), zeros(Float32, 4))
        close(o)
    end

    @testset "errors carry status and message" begin
        err = try
            SamOptimizer(rho = -1.0)
        catch e
            e
        end
        @test err isa SamError
        @test err.status == -2
        @test occursin("rho = -1", err.message)
        @test occursin("invalid argument", sprint(showerror, err))
        opt = SamOptimizer(backend = :cpu)
        e2 = try
            second_step!(opt)
        catch e
            e
        end
        @test e2 isa SamError && e2.status == -3
        W = zeros(Float32, 3)
        dW = Float32[0, NaN, 0]
        register!(opt, W, dW)
        e3 = try
            first_step!(opt)
        catch e
            e
        end
        @test e3 isa SamError && e3.status == -4 && occursin("element 1", e3.message)
        @test W == zeros(Float32, 3)
        @test_throws ArgumentError SamOptimizer(backend = :tpu)
    end

    @testset "SGD fused, groups, lr, skipped step, checkpoints" begin
        opt = SamOptimizer(base = :sgd, lr = 0.1, momentum = 0.9, backend = :cpu)
        W = Float32[1, -1]
        dW = zeros(Float32, 2)
        bias = Float32[0.5]
        dbias = zeros(Float32, 1)
        register!(opt, W, dW)
        id = register!(opt, bias, dbias)
        g = add_group!(opt, 0.5; weight_decay = 0.0)
        set_group!(opt, id, g)
        ref = [1.0, -1.0, 0.5]
        buf = zeros(3)
        for step in 0:4
            step == 3 && set_lr!(opt, 0.05)
            rate = step >= 3 ? 0.05 : 0.1
            g2 = [0.3 - 0.1step, 0.2, -0.4]
            dW .= Float32[0.1, 0.2]
            dbias .= Float32[0.3]
            first_step!(opt)
            dW .= Float32.(g2[1:2])
            dbias .= Float32(g2[3])
            @test second_step!(opt) == :done
            for i in 1:3
                buf[i] = step == 0 ? Float64(Float32(g2[i])) : 0.9buf[i] + Float64(Float32(g2[i]))
                ref[i] -= (i == 3 ? 0.5rate : rate) * buf[i]
            end
        end
        @test maximum(abs.(Float64.([W; bias]) .- ref)) < 1e-6
        @test lr(opt) == 0.05
        state = save_state(opt)
        load_state!(opt, state)
        bad = copy(state)
        bad[div(length(bad), 2)] ⊻= 0x01
        e = try
            load_state!(opt, bad)
        catch err
            err
        end
        @test e isa SamError && occursin("corrupted", e.message)
        path = tempname()
        save_state_file(opt, path)
        @test read(path) == state
        load_state_file!(opt, path)
        before = copy(W)
        first_step!(opt)
        dW[1] = Inf32
        @test second_step!(opt) == :skipped
        @test W == before
        @test step_count(opt) == 5
    end

    @testset "per-shard accumulation and the global norm" begin
        opt = SamOptimizer(backend = :cpu)
        W = Float32[3, 4]
        dW = Float32[3, 4]
        register!(opt, W, dW; grad_writable = true)
        @test grad_sq_norm_local(opt) == 25.0
        first_step_with_norm!(opt, 10.0)
        @test grad_norm(opt) == 10.0
        dW .= Float32[1, 3]
        accumulate_step!(opt)
        @test W == Float32[3, 4]
        dW .= Float32[3, 4]
        first_step!(opt)
        dW .= Float32[3, 5]
        accumulate_step!(opt)
        @test second_step!(opt) == :done
        @test dW == Float32[2, 4]
        calls = Ref(0)
        set_allreduce!(opt, v -> (v .*= 2; calls[] += 1))
        dW .= Float32[3, 4]
        first_step!(opt)
        @test calls[] == 1 && grad_norm(opt) ≈ sqrt(50)
        second_step!(opt)
        set_allreduce!(opt, v -> error("link down"))
        e = try
            first_step!(opt)
        catch err
            err
        end
        @test e isa SamError && e.status == -10
        set_allreduce!(opt, nothing)
        first_step!(opt)
        second_step!(opt)
    end

    @testset "finalizer frees the handle" begin
        for _ in 1:20
            opt = SamOptimizer(backend = :cpu)
            register!(opt, zeros(Float32, 100), zeros(Float32, 100))
        end
        GC.gc()
        @test true
    end
end
