"""Entry point: the ``ray`` executor. Light: ray is imported when a sweep starts."""

from mergekit_core import hookimpl


@hookimpl
def mk_executors():
    from mk_ray.executor import RayExecutor

    return [RayExecutor()]
