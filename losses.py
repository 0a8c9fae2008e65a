"""Every term of the Adversarial Wake-Sleep training step, one small function each.

Notation of ../SPEC (and the paper): W = (x, h1..h5) a wake state from the inference
network F, S = (h0..h5) a sleep state from the generator G, D the wake/sleep
discriminator, R the readout discriminator on F's h4, sg() stop-gradient.
The training loop in train.py owns backward() and the optimizer steps.
"""
import torch


def state_gradients(scores, states):
    """d(sum_b scores_b)/d(state) for each state tensor, keeping the graph for a penalty.

    Summing over the batch is right even though the minibatch-std feature couples
    samples: the gradient of the mean score is this divided by B. The training step has these
    (and their L1 norms) written out by discriminator_gradients.score_and_state_gradients; this autograd
    form is the definition the tests hold that to."""
    return torch.autograd.grad(scores.sum(), states, create_graph=True)


def score_and_state_gradients(discriminator, states, create_graph=True):
    """The plain path (--d-gradients autograd): D's score of states that are data, its gradient
    w.r.t. them and that gradient's per-sample L1 norm, by autograd through Discriminator.forward
    (a double backward when the norm is back-propagated). What discriminator_gradients
    writes out, for any D a researcher writes: slower, and nothing to port."""
    with torch.enable_grad():
        leaves = [h.detach().requires_grad_(True) for h in states]
        score = discriminator(leaves)
        grads = torch.autograd.grad(score.sum(), leaves, create_graph=create_graph)
        return score, [g.detach() for g in grads], l1_norms(grads)


def l1_norms(grads):
    """sum over state tensors of ||grad_b||_1, per sample: (B,)."""
    return sum(g.flatten(1).abs().sum(dim=1) for g in grads)


def l1_gradient_penalty(norms):
    """P1 = mean_b (||grad_s D(s)_b||_1 - 1) from the per-sample L1 norms over all state tensors.

    Taken at the samples themselves (no interpolation) and not squared, as the paper's code."""
    return (norms - 1).mean()


def l2_gradient_penalty(grad):
    """P2 = mean_b (||grad_u R(F4(u))_b||_2 - 1)^2, WGAN-GP on images, at the samples."""
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def discriminator_loss(d_wake, d_sleep, penalty_wake, penalty_sleep, gamma, lamda):
    """L_D = gamma [ -mean D(W) + mean D(S) + lamda P1(S) + lamda P1(W) ]: wake high, sleep low."""
    return gamma * (-d_wake.mean() + d_sleep.mean() + lamda * (penalty_sleep + penalty_wake))


def centering_loss(d_wake, d_sleep):
    """| mean D(S) + mean D(W) |: keeps D's scores around 0, so sigmoid(-D) is a usable weight."""
    return (d_sleep.mean() + d_wake.mean()).abs()


def inference_adversarial_loss(d_wake, gamma):
    """L_F = gamma mean D(W): inference makes its states look like sleep states to D."""
    return gamma * d_wake.mean()


def kl_from_standard_normal(h5):
    """KL(N(mu, var) || N(0, 1)) summed over top units; mu, var = batch mean and unbiased variance.

    0.5 sum(var + mu^2 - 1 - log(var)). Pulls the inferred top layer towards G's prior."""
    flat = h5.flatten(1)
    mu, var = flat.mean(dim=0), flat.var(dim=0, unbiased=True)
    return 0.5 * (var + mu.pow(2) - 1 - torch.log(var + 1e-12)).sum()


def surprisal_weights(d_wake):
    """2 sigmoid(-D(W)) per sample: G learns most from the wake states D finds least wake-like."""
    return 2 * torch.sigmoid(-d_wake.detach())


def generator_prediction_loss(generator, wake, weights=None):
    """sum_{k=1..5} mean | a_k(ConvT_k(sg W_k)) - sg W_{k-1} |.

    G learns to predict each inferred layer from the one above: the paper's
    'maximize the likelihood of lower-level inference activations' under Laplace noise.
    `weights` (B,) weighs each sample's term (--scale-gen-surprisal-by-D)."""
    per_sample = 0
    for k in range(1, 6):
        prediction = generator.predict(k, wake[k].detach())
        per_sample = per_sample + (prediction - wake[k - 1].detach()).abs().flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def readout_critic_loss(r_real, r_fake, penalty_real, penalty_fake, gamma, lamda2):
    """L_R = (1 - gamma) [ -mean R(F4(x)) + mean R(F4(sg G(z))) + lamda2 (P2(x) + P2(sg G(z))) ].

    Trains R and F together as a WGAN-GP critic on images."""
    return (1 - gamma) * (-r_real.mean() + r_fake.mean() + lamda2 * (penalty_real + penalty_fake))


def generator_readout_loss(r_fake, gamma):
    """-(1 - gamma) mean R(F4(G(z))): the WGAN generator term, stepped by G only."""
    return -(1 - gamma) * r_fake.mean()


# Surrogates: terms whose gradient, not value, is what a network must follow. Where a loss and its
# negation share a forward pass, the opposing network needs only the input-gradient that the
# critic's penalty computed anyway; multiplying the input by that (detached) gradient hands it down.

def inference_follows(wake, state_grads, gamma):
    """Gradient w.r.t. F of gamma mean D(W), given state_grads = d sum_b D(W)_b / dW (h1..h5)."""
    B = wake[0].size(0)
    return sum((h * g.detach()).sum() for h, g in zip(wake[1:], state_grads[1:])) * (gamma / B)


def generator_follows(image, image_grad, gamma):
    """Gradient w.r.t. G of -(1 - gamma) mean R(F4(G(z))), given image_grad = d sum_b R(F4(u))_b / du."""
    return (image * image_grad.detach()).sum() * (-(1 - gamma) / image.size(0))
