"""The jupyter_kernel_test conformance suite on the sm kernel: in a microVM, and through
the same relay with no VM."""

import pytest
from jupyter_client.manager import start_new_kernel
from jupyter_kernel_test import KernelTests

from tests.kernel.conftest import LOCAL_KERNEL, STARTUP_TIMEOUT, VM_KERNEL


class SmSamples(KernelTests):
    language_name = "python"
    file_extension = ".py"
    support_iopub_welcome = True

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise ValueError('sm')"
    code_execute_result = [{"code": "1+2+3", "result": "6"}, {"code": "[n*n for n in range(4)]",
                                                           "result": "[0, 1, 4, 9]"}]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>sm</b>'))", "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
         "mime": "text/latex"},
    ]
    code_history_pattern = "1?2*"
    # "range" is left out: IPython answers a range of the current session as session 0, and
    # the stock ipykernel fails that check the same way.
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; print('gone'); clear_output()"

    @classmethod
    def setUpClass(cls) -> None:
        cls.km, cls.kc = start_new_kernel(kernel_name=cls.kernel_name, startup_timeout=STARTUP_TIMEOUT)


@pytest.mark.usefixtures("linux_kvm")
class TestSmKernelInMicroVm(SmSamples):
    kernel_name = VM_KERNEL


class TestSmKernelRelayWithoutVm(SmSamples):
    kernel_name = LOCAL_KERNEL


del SmSamples, KernelTests  # only the concrete classes are collected
