"""The objective of Adversarial Wake-Sleep: every term of the training step, one small function
each, and step_losses, the forward passes of one step that produce them.

Notation of docs/algorithm.md (and the paper): W = (x, h1..h5) a wake state from the inference
network F, S = (h0..h5) a sleep state from the generator G, D the wake/sleep
discriminator, R the readout discriminator on F's h4, sg() stop-gradient.
step.py owns backward(), the order of updates and the optimizer steps.
"""
from dataclasses import dataclass

import torch

import discriminator_gradients


def state_gradients(scores, states):
    """d(sum_b scores_b)/d(state) for each state tensor, keeping the graph for a penalty.

    Summing over the batch is right even though the minibatch-std feature couples
    samples: the gradient of the mean score is this divided by B. The training step has these
    (and their L1 norms) written out by discriminator_gradients.score_and_state_gradients; this autograd
    form is the definition the tests hold that to."""
    return torch.autograd.grad(scores.sum(), states, create_graph=True)


def score_and_state_gradients(discriminator, states, create_graph=True, norm="l1"):
    """The plain path (--d-gradients autograd): D's score of states that are data, its gradient
    w.r.t. them and that gradient's per-sample L1 norm, by autograd through Discriminator.forward
    (a double backward when the norm is back-propagated). What discriminator_gradients
    writes out, for any D a researcher writes: slower, and nothing to port."""
    with torch.enable_grad():
        leaves = [h.detach().requires_grad_(True) for h in states]
        score = discriminator(leaves)
        grads = torch.autograd.grad(score.sum(), leaves, create_graph=create_graph)
        return score, [g.detach() for g in grads], l1_norms(grads) if norm == "l1" else l2_norms(grads)


def l1_norms(grads):
    """sum over state tensors of ||grad_b||_1, per sample: (B,)."""
    return sum(g.flatten(1).abs().sum(dim=1) for g in grads)


def l2_norms(grads):
    """The L2 norm of the whole state's gradient (all tensors together), per sample: (B,)."""
    return sum(g.flatten(1).pow(2).sum(dim=1) for g in grads).sqrt()


def l1_gradient_penalty(norms):
    """P1 = mean_b (||grad_s D(s)_b||_1 - 1) from the per-sample L1 norms over all state tensors.

    Taken at the samples themselves (no interpolation) and not squared, as the paper's code."""
    return (norms - 1).mean()


def two_sided_gradient_penalty(norms):
    """P1' = mean_b (||grad_s D(s)_b||_2 - 1)^2 from the per-sample L2 norms over all state tensors
    (--d-penalty two-sided): WGAN-GP's form on states, which also pushes a norm below 1 up."""
    return (norms - 1).pow(2).mean()


D_PENALTIES = {"one-sided-l1": (l1_gradient_penalty, "l1"), "two-sided-l2": (two_sided_gradient_penalty, "l2")}


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


def prediction_errors(predict, sources, targets):
    """(B,) sum_{k=1..5} mean_units | predict(k, sg sources[k-1]) - sg targets[k-1] |: the negative
    log-likelihood, up to constants, of each target layer under Laplace noise around the prediction."""
    per_sample = 0
    for k, (source, target) in enumerate(zip(sources, targets), start=1):
        per_sample = per_sample + (predict(k, source.detach()) - target.detach()).abs().flatten(1).mean(dim=1)
    return per_sample


def generator_prediction_errors(generator, wake):
    """(B,) sum_{k=1..5} mean | a_k(ConvT_k(sg W_k)) - sg W_{k-1} |: each wake state's term below."""
    return prediction_errors(generator.predict, wake[1:], wake[:-1])


def laplace_scale_loss(generator, wake):
    """L_b = sum_{k=2..5} mean_{b,c,i,j} ( |sg W_{k-1} - sg mu_k| / b_k,c + log b_k,c ), mu_k = a_k(ConvT_k(W_k)):
    the Laplace negative log-likelihood of each wake layer h1..h4 around G's prediction, in the
    per-channel scales b alone (--dream-noise laplace). Its minimum, b_k,c = the mean |residual| of
    channel c, is the maximum-likelihood scale; G dreams with it (Generator._laplace_block)."""
    total = 0
    for k in range(2, 6):
        with torch.no_grad():
            residual = (generator.predict(k, wake[k]) - wake[k - 1]).abs()
        log_b = generator.log_scales[k - 2].view(1, -1, 1, 1)
        total = total + (residual * torch.exp(-log_b) + log_b).mean()
    return total


def generator_prediction_loss(generator, wake, weights=None):
    """L_G,pred = mean_b sum_{k=1..5} mean | a_k(ConvT_k(sg W_k)) - sg W_{k-1} |.

    G learns to predict each inferred layer from the one above: the paper's
    'maximize the likelihood of lower-level inference activations' under Laplace noise.
    `weights` (B,) weighs each sample's term (--scale-gen-surprisal-by-D)."""
    per_sample = generator_prediction_errors(generator, wake)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def inference_sleep_prediction_loss(inference, sleep):
    """L_F,sleep = mean_b sum_{k=1..5} mean | N(b_k(BN_k(Conv_k(DeReLU_k(sg S_{k-1}))))) - sg S_k |.

    Classic Wake-Sleep's sleep phase (--inference-rule wake-sleep), the mirror of L_G,pred: F
    learns to predict each dreamed layer from the one below, under the same Laplace noise, through
    the computation it runs at wake (Inference.predict)."""
    return prediction_errors(inference.predict, sleep[:-1], sleep[1:]).mean()


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


# --- The objective of one step: every forward pass and term, at the current parameters --------------

METRICS = ("loss_d", "loss_f", "loss_g", "loss_r", "d_wake", "d_sleep")


@dataclass(frozen=True)
class StepConfig:
    gamma: float = 1.0
    lamda: float = 0.3
    lamda2: float = 10.0
    kl_from_sn: bool = False
    scale_by_d: bool = False
    prioritized_replay: bool = False
    gradient_clipping: float = 50.0
    amp: bool = False  # bf16 autocast of the forward passes
    update_order: str = "alternating"  # or "simultaneous" (training_step)
    inference_rule: str = "adversarial"  # or "wake-sleep": F learns from sleep states, no D (step_losses)
    d_gradients: str = "written-out"  # or "autograd": how D's state gradients are taken (d_terms)
    d_penalty: str = "one-sided-l1"  # or "two-sided-l2" (D_PENALTIES); the latter's norms by autograd

    @classmethod
    def from_args(cls, args):
        return cls(gamma=args.gamma, lamda=args.lamda, lamda2=args.lamda2, kl_from_sn=args.kl_from_sn,
                   scale_by_d=args.scale_gen_surprisal_by_D, prioritized_replay=args.prioritized_replay,
                   gradient_clipping=args.gradient_clipping, amp=args.amp, update_order=args.update_order,
                   d_gradients=args.d_gradients, d_penalty=getattr(args, "d_penalty", "one-sided-l1"),
                   # the flags of a checkpoint from before --inference-rule existed are the adversarial rule's
                   inference_rule=getattr(args, "inference_rule", "adversarial"))


def as_data(states, dtype):
    # In the data's precision (float32 under --amp), so the penalties' gradients and norms are too.
    return [h.detach().to(dtype) for h in states]


@dataclass
class StepTerms:
    """The forward passes of one step, as step_losses leaves them for training_step."""
    loss_d: torch.Tensor  # L_D: reaches D only
    loss_rest: torch.Tensor  # L_R (R and F), F's KL term or L_F,sleep, G's prediction term
    wake: list  # F's states of the batch, with F's graph
    state_grads: list  # d sum_b D(W)_b / dW at the current D (None at gamma 0)
    image: torch.Tensor  # G(z), with G's graph (None without a readout)
    image_grad: torch.Tensor  # d sum_b R(F4(u))_b / du at u = sg G(z), current F and R (None without)
    out: dict  # metrics as 0-d tensors

    def simultaneous_total(self, gamma):
        """One loss whose gradient w.r.t. each network is that network's gradient, every one
        taken at the current weights: F and G follow the critics through the kept input-gradients."""
        total = self.loss_d + self.loss_rest
        if self.state_grads is not None:
            total = total + inference_follows(self.wake, self.state_grads, gamma)
        if self.image is not None:
            total = total + generator_follows(self.image, self.image_grad, gamma)
        return total


def d_terms(D, states, hp, graph=True):
    """(score, state gradients, their per-sample norms, L1 or L2 as hp.d_penalty wants) of D at data
    states, by the path hp asks for; graph=False: the state gradients alone are wanted (F following a
    stepped D)."""
    norm = D_PENALTIES[hp.d_penalty][1]
    if hp.d_gradients == "autograd" or norm != "l1":  # the written-out path gives L1 norms only
        return score_and_state_gradients(D, states, create_graph=graph, norm=norm)
    return discriminator_gradients.score_and_state_gradients(D, states)


def readout_terms(F, R, x, h4, image, hp):
    """L_R of the real batch x (its F4 is h4; x requires grad) and of the generated image, as data:
    (L_R, R(F4(sg image)), d sum_b R(F4(u))_b / du at u = sg image, kept for G)."""
    r_real = R(h4).to(x.dtype)
    (grad_real,) = torch.autograd.grad(r_real.sum(), x, create_graph=True)
    fake = image.detach().to(x.dtype).requires_grad_(True)
    r_fake = R(F(fake, to_layer=4)[4]).to(x.dtype)
    (grad_fake,) = torch.autograd.grad(r_fake.sum(), fake, create_graph=True)
    loss_r = readout_critic_loss(r_real, r_fake, l2_gradient_penalty(grad_real), l2_gradient_penalty(grad_fake),
                                 hp.gamma, hp.lamda2)
    return loss_r, r_fake, grad_fake


def step_losses(nets, x, hp: StepConfig):
    """The forward passes and loss terms of one step, at the current parameters.

    Every term reaches only its own network. Where a loss and its negation share a forward
    pass (D and F on the wake state; R and G on the sleep image) the pass runs once, and the
    input-gradient that the critic's penalty needs anyway is kept (state_grads, image_grad):
    the simultaneous order hands it to the opposing network through a surrogate term
    (inference_follows, generator_follows)."""
    F, G, D, R = nets.inference, nets.generator, nets.discriminator, nets.readout
    B = x.size(0)
    zero = x.new_zeros(())
    out = dict.fromkeys(METRICS, zero)

    # --- Wake: the inference network samples a state from the data.
    if R is not None:
        x = x.detach().requires_grad_(True)  # P2 needs d R(F4(x)) / dx
    wake = F(x)

    # --- Sleep: the generator dreams a state from noise.
    z = torch.randn(B, nets.cfg.noise_dim, 1, 1, device=x.device, dtype=x.dtype)
    g_wake = None
    adversarial = hp.inference_rule == "adversarial" and hp.gamma > 0  # gamma 0 trains no D
    if adversarial:
        d_wake, g_wake, norms_wake = d_terms(D, as_data(wake, x.dtype), hp)
        d_wake = d_wake.to(x.dtype)
        if hp.prioritized_replay:
            # Replay the top layers of the wake samples D found least wake-like.
            worst = d_wake.detach().argsort()[:B // 2]
            z[:B // 2] = wake[5].detach()[worst]
    with torch.set_grad_enabled(R is not None):  # without a readout, sleep states are only ever detached
        sleep = G(z)

    sleep_term = zero
    if adversarial:
        # --- Discriminator: wake states high, sleep states low.
        d_sleep, _, norms_sleep = d_terms(D, as_data(sleep, x.dtype), hp)
        d_sleep = d_sleep.to(x.dtype)
        penalty = D_PENALTIES[hp.d_penalty][0]
        loss_d = discriminator_loss(d_wake, d_sleep, penalty(norms_wake), penalty(norms_sleep), hp.gamma, hp.lamda)
        if hp.scale_by_d:
            loss_d = loss_d + centering_loss(d_wake, d_sleep)
        # --- Inference, adversarial: gamma mean D(W); F follows it through g_wake (training_step).
        loss_f = inference_adversarial_loss(d_wake, hp.gamma)

        # --- Generator, predictive: each layer predicts the inferred layer below.
        weights = surprisal_weights(d_wake) if hp.scale_by_d else None
        prediction = hp.gamma * generator_prediction_loss(G, wake, weights)
        out.update(loss_d=loss_d.detach(), d_wake=d_wake.detach().mean(), d_sleep=d_sleep.detach().mean())
    elif hp.gamma > 0:
        # --- Inference, classic Wake-Sleep: each dreamed layer predicted from the one below. No D.
        loss_d = zero
        loss_f = sleep_term = hp.gamma * inference_sleep_prediction_loss(F, sleep)
        # --- Generator, predictive, as above.
        prediction = hp.gamma * generator_prediction_loss(G, wake)
    else:
        loss_d = loss_f = prediction = zero
    loss_g, kl = prediction, zero
    if G.log_scales and hp.gamma > 0:  # --dream-noise laplace: reaches the scales b alone, not reported in loss_g
        prediction = prediction + laplace_scale_loss(G, wake)
    if hp.kl_from_sn:
        # In both rules: the release's pull of h5's batch statistics toward the prior is a regularizer
        # of F beside its rule, and the rules are compared with the same regularizers (docs/wake_sleep.md).
        kl = 1e-4 * kl_from_standard_normal(wake[5].to(x.dtype))
        loss_f = loss_f + kl

    loss_r, grad_fake = zero, None
    if R is not None:
        # --- Readout: R(F4(.)) is a WGAN-GP critic on images, trained with F.
        loss_r, r_fake, grad_fake = readout_terms(F, R, x, wake[4], sleep[0], hp)
        # Reported at the current F and R; G follows it through image_grad or a fresh pass (training_step).
        loss_g = loss_g + generator_readout_loss(r_fake.detach(), hp.gamma)

    out.update(loss_f=loss_f.detach(), loss_g=loss_g.detach(), loss_r=loss_r.detach())
    return StepTerms(loss_d, loss_r + kl + prediction + sleep_term, wake, g_wake, sleep[0] if R is not None else None, grad_fake,
                     out)
