import jax, jax.numpy as jnp, numpy as np
from diffusion_jax import samplers
from diffusion_jax.sde import chain
from diffusion_jax.schedules import linear_beta_schedule, make_schedule
T=100; SCHED = make_schedule(linear_beta_schedule(T))
X_T = jax.random.normal(jax.random.PRNGKey(0), (4, 3)); KEY = jax.random.PRNGKey(1)
denoise = lambda x, t: jnp.tanh(x) * (1.0 + t[:, None] / T)
options = samplers.make_options(num_steps=6, eta=0.5, churn=1.0, langevin_steps_each=2)
name="edm_heun"
plain = jax.jit(lambda k: samplers.run(name, denoise, SCHED, X_T, k, options))(KEY)
def f(k):
    with chain.recording() as r:
        x = samplers.run(name, denoise, SCHED, X_T, k, options)
    return x, r
x0, r = jax.jit(f)(KEY)
print(len(r), np.abs(np.asarray(x0)-np.asarray(plain)).max())
x0, st = jax.jit(lambda k: samplers.run_with_status(name, denoise, SCHED, X_T, k, options))(KEY)
print(np.abs(np.asarray(x0)-np.asarray(plain)).max())
x0, r = jax.jit(lambda k: (lambda rr: (rr[0], rr[1][0]))(f(k)))(KEY)
print("scan only", np.abs(np.asarray(x0)-np.asarray(plain)).max())
x0, r = jax.jit(lambda k: (lambda rr: (rr[0], rr[1][1]))(f(k)))(KEY)
print("final only", np.abs(np.asarray(x0)-np.asarray(plain)).max())
