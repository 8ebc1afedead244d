"""Fixes to older Tritons' interpreter (TRITON_INTERPRET=1), applied by `_common` when the
interpreter is on, so the kernels run under it on every Triton the package allows
(pyproject: triton>=3.2): the tests, the sweep's traffic mode and the kernel notebook on CPU.
Only the interpreter is touched; compiled kernels never go through it. Fixes 1 and 2 are what a
later Triton does itself, and apply only to the versions that need it; fix 3 is needed by every
Triton up to 3.9, the newest.

1. Triton 3.6 and older with NumPy 2.3 or newer: the interpreter turns a scalar into a Python
   int with `int(array)` on a one-element array of ndim 1, which NumPy 2.3 refuses ("only
   0-dimensional arrays can be converted to Python scalars"), so every kernel whose loop bound
   is an argument fails. Triton 3.7 squeezes the array first. The GPU image holds such a pair
   (Triton 3.6, NumPy 2.5), and tests/compiled_kernels.py runs kernels interpreted there.
2. Triton 3.2: a reduction or `where` over int32 values can hold int64 NumPy data while typed
   int32 (NumPy's promotion), and the store then writes 8 bytes per int32 element, past the
   end of the output: heap corruption (`free(): invalid pointer`) in pool_hw's tie count.
   Triton 3.6 and later keep the data in the declared type: the store casts it. Tritons 3.3 to
   3.5 pass the tie tests without the fix too (their store is 3.2's, unchanged), and keep it:
   it casts only data whose type disagrees with the pointer's, so it changes nothing there.
3. Every Triton: the interpreter converts fp32 to bf16 by dropping the low 16 bits (rounding
   toward zero), where a compiled kernel rounds to nearest even (LLVM's fptrunc, `cvt.rn` on
   NVIDIA), as torch does. Every bf16 value the kernels store goes through it, so under the
   interpreter bf16 outputs were biased toward zero: summed over the spatial norm's inputs, the
   bias made the norm weight's gradient miss the float64 oracle by 3% at 2×218×13×17, where
   timm in bf16 misses it by 0.06%. The fix converts through torch, which rounds as a GPU
   does; tests/test_rounding.py checks the kernels' bf16 and fp16 outputs against torch's.
"""
import numpy
import torch
import triton
import triton.language as tl


def version_tuple(text: str) -> tuple:
    """(major, minor) of a version string such as "2.8.0+cu128" (tuning uses it too)."""
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def fix_interpreter():
    """Apply the fixes this Triton and NumPy need (idempotent)."""
    from triton.runtime import interpreter

    if version_tuple(triton.__version__) < (3, 7) and version_tuple(numpy.__version__) >= (2, 3):
        patch_tensor = interpreter._patch_lang_tensor
        if not getattr(patch_tensor, "fixed", False):
            def patch_tensor_fixed(tensor, *scope):
                # Triton 3.6 passes a scope that undoes the patch after the launch; 3.4 has
                # none and sets the attributes for good, and so does this.
                patch_tensor(tensor, *scope)
                index = lambda self: int(self.handle.data.squeeze())  # noqa: E731
                if scope:
                    scope[0].set_attr(tensor, "__index__", index)
                else:
                    tensor.__index__ = index

            patch_tensor_fixed.fixed = True
            interpreter._patch_lang_tensor = patch_tensor_fixed

    if version_tuple(triton.__version__) < (3, 6):
        builder = interpreter.InterpreterBuilder
        store = builder.create_masked_store
        if not getattr(store, "fixed", False):
            def store_in_declared_type(self, ptrs, value, mask, *hints):
                declared = interpreter._get_np_dtype(ptrs.get_element_ty())
                if value.data.dtype != declared:
                    value = interpreter.TensorHandle(value.data.astype(declared), value.dtype)
                return store(self, ptrs, value, mask, *hints)

            store_in_declared_type.fixed = True
            builder.create_masked_store = store_in_declared_type

    cast = interpreter.InterpreterBuilder.cast_impl
    if not getattr(cast, "fixed", False):
        def cast_rounding_to_bf16(self, src, dst_type):
            if dst_type.scalar == tl.bfloat16 and src.dtype.scalar == tl.float32:
                rounded = torch.tensor(src.data).to(torch.bfloat16)  # bf16 is stored as uint16
                bits = rounded.view(torch.int16).numpy().view(numpy.uint16)
                return interpreter.TensorHandle(bits, tl.bfloat16)
            return cast(self, src, dst_type)

        cast_rounding_to_bf16.fixed = True
        interpreter.InterpreterBuilder.cast_impl = cast_rounding_to_bf16
