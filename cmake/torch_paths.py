"""Print the include/library paths and ABI of the installed torch for CMakeLists.txt.

Uses torch.utils.cpp_extension's own path helpers, which work for CPU and CUDA
builds of torch alike, even on a machine without a CUDA toolkit.
"""
import torch
from torch.utils import cpp_extension

print("TORCH_VERSION=" + torch.__version__)
print("TORCH_CUDA_VERSION=" + (torch.version.cuda or ""))
print("TORCH_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
print("TORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()))
print("TORCH_LIBRARY_DIRS=" + ";".join(cpp_extension.library_paths()))
