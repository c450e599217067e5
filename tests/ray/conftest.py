import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh 2-CPU local Ray instance per module.

    ``address="local"`` always starts a new instance: a plain ``ray.init()`` would attach to
    any head left running on this machine by ``ray start`` and then refuse ``num_cpus``.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
