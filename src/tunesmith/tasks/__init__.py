"""Tasks: what a model learns to do, one module (or small package) each.

A task owns everything about its kind of data and output (the `Task` protocol in
tunesmith.plugins): its config section, the records it reads, its data checks, the model it needs
and which methods fit it, preparation before training, its objective (batching, loss, metrics),
its headline metrics, and what predict, evaluate and score return. It registers itself with
`@register_task(name)`; the built-in ones are listed in tunesmith.registry.BUILTIN_TASKS.

Tasks do not import each other: what several share lives in base.py (defaults and the helpers of
the causal-LM and classifier families) or below, in data/, models/, losses/, eval/ and training/.
"""
