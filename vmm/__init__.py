"""sm's virtual machine monitor: boots Linux microVMs on KVM from Python.

``from vmm import Machine`` is the library API (vmm/machine.py).
"""


def __getattr__(name: str):
    # Loaded on first use: `import vmm.kvm` and the CLI need none of the image machinery.
    if name == "Machine":
        from vmm.machine import Machine

        return Machine
    raise AttributeError(f"module 'vmm' has no attribute {name!r}")
