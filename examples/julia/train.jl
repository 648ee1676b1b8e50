# A small MLP written in plain Julia, trained with SAM through SamOpt.jl: two concentric rings, with
# 10% of the training labels flipped. The plugin runs SGD too (base = :sgd), fused with its restore.
# With the package in the active environment (Pkg.develop(path = "bindings/julia") once):
#   SAMOPT_LIB=target/release/libsamopt.so julia --project=<that environment> examples/julia/train.jl
using SamOpt
using Random

function rings(n, rng)
    X = zeros(Float32, 2, n)
    y = zeros(Float32, n)
    for i in 1:n
        label = i % 2
        r = label == 1 ? 1.0 + 0.15randn(rng) : 0.4 + 0.15randn(rng)
        θ = 2π * rand(rng)
        X[:, i] .= (r * cos(θ), r * sin(θ))
        y[i] = label
    end
    return X, y
end

rng = MersenneTwister(7)
X, y = rings(400, rng)
Xtest, ytest = rings(400, rng)
noisy = copy(y)
flip = randperm(rng, length(y))[1:40]
noisy[flip] .= 1 .- noisy[flip]

H = 16
W1 = Float32.(randn(rng, H, 2) .* sqrt(2 / 2)); b1 = zeros(Float32, H)
W2 = Float32.(randn(rng, 1, H) .* sqrt(2 / H)); b2 = zeros(Float32, 1)
params = (W1, b1, W2, b2)
grads = map(zero, params)

sigmoid(z) = 1 / (1 + exp(-z))

# Mean logistic loss over the batch; writes the gradients into `grads`.
function loss_and_grad!(grads, X, y)
    dW1, db1, dW2, db2 = grads
    Z1 = W1 * X .+ b1
    A1 = max.(Z1, 0f0)
    p = vec(sigmoid.(W2 * A1 .+ b2))
    n = length(y)
    loss = -sum(y .* log.(p .+ 1f-7) .+ (1 .- y) .* log.(1 .- p .+ 1f-7)) / n
    d2 = reshape((p .- y) ./ n, 1, n)
    dW2 .= d2 * A1'
    db2 .= vec(sum(d2; dims = 2))
    d1 = (W2' * d2) .* (Z1 .> 0)
    dW1 .= d1 * X'
    db1 .= vec(sum(d1; dims = 2))
    return loss
end

accuracy(X, y) = sum((vec(sigmoid.(W2 * max.(W1 * X .+ b1, 0f0) .+ b2)) .> 0.5) .== (y .> 0.5)) / length(y)

opt = SamOptimizer(rho = 0.05, base = :sgd, lr = 0.5, momentum = 0.9, backend = :cpu)
for (p, g) in zip(params, grads)
    register!(opt, p, g)
end
epochs = 300
for epoch in 1:epochs
    set_lr!(opt, 0.25 * (1 + cos(π * (epoch - 1) / epochs)))    # cosine schedule
    loss = loss_and_grad!(grads, X, noisy)    # gradient at w
    first_step!(opt)                          # w -> w + e(w)
    loss_and_grad!(grads, X, noisy)           # gradient at w + e(w)
    second_step!(opt)                         # restore and SGD update
    if epoch % 50 == 0 || epoch == 1
        println("epoch $epoch  loss $(round(loss; digits = 4))  clean test accuracy $(accuracy(Xtest, ytest))")
    end
end
acc = accuracy(Xtest, ytest)
println("samopt via SamOpt.jl: $(step_count(opt)) SAM steps, clean test accuracy $acc")
acc > 0.9 || error("training did not converge (accuracy $acc)")
