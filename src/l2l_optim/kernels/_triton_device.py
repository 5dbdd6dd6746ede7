"""The Triton device code of the fused SimpleOptimizer update (:mod:`.triton` launches it).

``@triton.jit`` functions only: the update's passes (:func:`_step_kernel`, whose ``MODE`` picks
pass 1, pass 2 or pass 2 with the recomputation for 16-bit parameters, and
:func:`_shift_kernel`), the per-tensor bias correction (:func:`_ones_kernel`), the fixed-order
reductions of the partial sums (:func:`_reduce_kernel`, :func:`_segment_kernel`), the
non-finite scan (:func:`_nonfinite_kernel`) and the tanh alone (:func:`_tanh_kernel`, for its
tests), with their helpers. Nothing here exists where Triton is not importable.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no triton (CPU-only torch build, macOS, ...); triton.py says why
    triton = None
    tl = None

__all__: list[str] = []

if triton is not None:

    @triton.jit
    def _tanh(x, F64: tl.constexpr):
        # |x| < 0.55: |x| + |x|^3 P(x^2), P a minimax fit of (tanh(x) - x) / x^3 (degree 4
        # for fp32, 10 for fp64). Above: fp32 1 + e Q(e) with e = exp(-2|x|) in (0, 0.333], Q
        # a minimax fit of -2 / (1 + e), so that 1 + e Q(e) = (1 - e) / (1 + e) = tanh|x|
        # (exactly 1 once e underflows): no division on the fp32 path; fp64 keeps
        # 1 - 2 / (1 + exp(2|x|)). Both are computed on |x| and the sign of x is put back
        # with one bit operation (-0 stays -0, NaN stays NaN).
        a = tl.abs(x)
        t = x * x
        if F64:
            # (literals meet a tensor first: Triton then builds them in the tensor's dtype)
            p = t * -2.060276537636634e-05 + 8.511313685577672e-05
            p = p * t + -0.0002346347410887237
            p = p * t + 0.0005889360520074057
            p = p * t + -0.001455661830100716
            p = p * t + 0.003592110378689024
            p = p * t + -0.008863234397814355
            p = p * t + 0.021869488493666944
            p = p * t + -0.053968253967434016
            p = p * t + 0.13333333333332714
            p = p * t + -0.3333333333333333
            y = 2.0 * a
            y = tl.where(y > 40.0, 40.0, y)  # keeps NaN
            big = 1.0 - 2.0 / (1.0 + tl.exp(y))  # fp64 division is IEEE-rounded
            bits: tl.constexpr = tl.uint64
        else:
            p = t * -0.0062823668122291565 + 0.021077677607536316
            p = p * t + -0.0538538359105587
            p = p * t + 0.13332600891590118
            p = p * t + -0.33333319425582886
            e = tl.exp2(a * -2.8853900817779268)  # exp(-2|x|); NaN stays NaN
            q = e * -0.6112289 + 1.4250705
            q = q * e + -1.8610573
            q = q * e + 1.9808226
            q = q * e + -1.9985865
            q = q * e + 1.9999527
            q = q * e + -1.9999995
            big = q * e + 1.0
            bits: tl.constexpr = tl.uint32
        small = a + (a * t) * p
        r = tl.where(a < 0.55, small, big).to(bits, bitcast=True)
        sign = x.to(bits, bitcast=True) & (1 << (bits.primitive_bitwidth - 1))
        return (r | sign).to(x.dtype, bitcast=True)

    @triton.jit
    def _rms_input32(g, v, c, eps):
        # g / (sqrt(v) (1 / sqrt(c)) + eps) in fp32 without a division or a correctly rounded
        # square root (whose slow paths cost more instructions than the recurrence of a hidden
        # unit): hardware reciprocal square roots refined by one Newton step each, within an
        # ulp or two of torch's result. c >= 1 - beta > 0 always; v >= 0 may be 0 or
        # subnormal, whose approximate square root is 0 (the eps term dominates there).
        rc = tl.math.rsqrt(c)
        rc = rc + (0.5 * rc) * (1.0 - (c * rc) * rc)
        den = tl.sqrt(v) * rc + eps
        # 1 / den from rsqrt(den)^2, then one Newton step on the quotient itself:
        # q = q0 + r (g - den q0) is g / den to within an ulp (den in [eps, ~6e20], or inf / NaN
        # for a non-finite g, which gives NaN as torch's inf / inf does)
        r = tl.math.rsqrt(den)
        r = r * r
        q = g * r
        return q + (g - den * q) * r

    @triton.jit
    def _to_bf16(x):
        # fp32 -> bf16, round to nearest even, NaN -> 0x7FC0 (== c10::BFloat16), with bit ops:
        # the interpreter's .to(tl.bfloat16) truncates
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _to_bf16_stochastic(x, seq_g):
        # fp32 -> bf16 rounded stochastically (rounding.py): the pattern plus the high half of
        # seq_g = seq * GOLDEN (modulo 2^32), truncated; NaN -> 0x7FC0
        r = seq_g >> 16
        u = x.to(tl.uint32, bitcast=True)
        b = tl.where(x != x, 0x7FC0, (u + r) >> 16)
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _store(ptr, x, mask, DT: tl.constexpr, NATIVE_BF16: tl.constexpr):
        if DT == tl.bfloat16:
            # (from fp64 through fp32, as c10's conversion goes)
            if NATIVE_BF16:
                tl.store(ptr, x.to(tl.float32).to(tl.bfloat16, fp_downcast_rounding="rtne"),
                         mask=mask)
            else:
                tl.store(ptr, _to_bf16(x.to(tl.float32)), mask=mask)
        else:
            tl.store(ptr, x.to(DT), mask=mask)

    @triton.jit
    def _locate(blk, tab, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        # this program's block: its tensor's table row and element count, the block's first
        # coordinate and length (at most BLOCK; a multiple of 8 in an aligned group)
        pid = tl.program_id(0)
        t = tl.load(blk + pid)
        row = tab + t * 8  # _triton_tables.ROW slots per tensor
        start = (pid - tl.load(row + 7)) * BLOCK
        n = tl.load(row + 5)
        rem = tl.minimum(n - start, BLOCK).to(tl.int32)
        if ALIGNED:
            n = tl.multiple_of(n, 8)
            rem = tl.multiple_of(rem, 8)
        return pid, t, row, n, start, rem

    @triton.jit
    def _base(slot, offset, DT: tl.constexpr, ALIGNED: tl.constexpr):
        # the address held in a table slot, as a DT pointer, ``offset`` elements on; in an
        # aligned group it is 16-byte aligned, which lets Triton emit 128-bit accesses
        ptr = tl.load(slot).to(tl.pointer_type(DT)) + offset
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        return ptr

    @triton.jit
    def _w_hh_times_h(w_ptr, j, hs, acc, H: tl.constexpr, C_DT: tl.constexpr):
        # acc + w_hh[j, :] . h, one fused multiply-add per row of h (the tuple hs)
        for rows in tl.static_range(H):
            acc = acc + tl.load(w_ptr + H + j * H + rows).to(C_DT) * hs[rows]
        return acc

    @triton.jit
    def _step_kernel(
        tab, blk, lr_ptr, w_ptr, norm_ptr, part_ptr, shared_ptr, skip_ptr, key_ptr,
        H: tl.constexpr, BLOCK: tl.constexpr,
        P_DT: tl.constexpr, G_DT: tl.constexpr, H_DT: tl.constexpr, C_DT: tl.constexpr,
        MODE: tl.constexpr, HAS_SKIP: tl.constexpr, C_LAYOUT: tl.constexpr,
        ALIGNED: tl.constexpr, NATIVE_BF16: tl.constexpr, STOCHASTIC: tl.constexpr,
    ):
        # MODE 0: pass 1 of fp32/fp64 parameters (writes h', the running means and theta +
        # lr u; the block's partial sum). MODE 1: pass 1 of bf16/fp16 parameters (the
        # partial sum only). MODE 2: pass 2 of bf16/fp16 parameters (recomputes pass 1 from
        # the same inputs, writes h', the running means and round(theta + lr (u + shared))).
        F64: tl.constexpr = C_DT == tl.float64
        pid, t, row, n, start, rem = _locate(blk, tab, BLOCK, ALIGNED)
        idx = tl.arange(0, BLOCK)
        mask = idx < rem
        if HAS_SKIP:
            mask = mask & (tl.load(skip_ptr) == 0)

        x = tl.load(_base(row + 1, start, G_DT, ALIGNED) + idx, mask=mask, other=0.0).to(C_DT)
        if C_LAYOUT != 0:
            # rule.rms_normalise: v' = beta v + ((1 - beta) g) g, saturated at the largest
            # finite value unless g is infinite, c' = beta c + (1 - beta),
            # x = g / (sqrt(v') (1 / sqrt(c')) + eps); correctly rounded sqrt and division,
            # as torch's (fp32 '/' on a GPU is an approximation)
            beta = tl.load(norm_ptr).to(C_DT)
            omb = tl.load(norm_ptr + 1).to(C_DT)
            eps = tl.load(norm_ptr + 2).to(C_DT)
            vmax = tl.load(norm_ptr + 3 + F64).to(C_DT)
            vp = _base(row + 3, start, C_DT, ALIGNED)
            v = tl.load(vp + idx, mask=mask, other=0.0) * beta + (omb * x) * x
            v = tl.where((v > vmax) & (tl.abs(x) <= vmax), vmax, v)
            if C_LAYOUT == 1:
                cp = _base(row + 4, start, C_DT, ALIGNED)
                c = tl.load(cp + idx, mask=mask, other=0.0) * beta + omb
            else:  # one c per tensor: _ones_kernel advances it once all programs read it
                c = tl.load(tl.load(row + 4).to(tl.pointer_type(C_DT))) * beta + omb
            if MODE != 1:
                tl.store(vp + idx, v, mask=mask)
                if C_LAYOUT == 1:
                    tl.store(cp + idx, c, mask=mask)
            if F64:  # fp64 division and sqrt round correctly as they are
                x = x / (tl.sqrt(v) * (1.0 / tl.sqrt(c)) + eps)
            else:
                x = _rms_input32(x, v, c, eps)

        # the H rows of the block's hidden state, all read before any is written
        hs = ()
        for k in tl.static_range(H):
            hk = tl.load(_base(row + 2, k * n + start, H_DT, ALIGNED) + idx, mask=mask,
                         other=0.0)
            hs = hs + (hk.to(C_DT),)

        # weights: [w_ih (H), w_hh (H*H), b_h (H), w_a (H), w_b (H), b_out], in any float
        # dtype, rounded to the compute dtype here
        u = tl.zeros([BLOCK], dtype=C_DT) + tl.load(w_ptr + 4 * H + H * H).to(C_DT)
        s = tl.zeros([BLOCK], dtype=C_DT)
        if STOCHASTIC:
            # the rounding sequence of unit 0, key + i H for coordinate i, times GOLDEN (modulo
            # 2^32); unit j's is that plus j GOLDEN: one multiplication per coordinate
            key = (tl.load(key_ptr + tl.load(row + 6)) & 0xFFFFFFFF).to(tl.uint32)
            seq0_g = (key + ((start + idx) * H).to(tl.uint32)) * 0x9E3779B1
        for j in tl.static_range(H):
            pre = tl.load(w_ptr + j).to(C_DT) * x + tl.load(w_ptr + H + H * H + j).to(C_DT)
            hn = _tanh(_w_hh_times_h(w_ptr, j, hs, pre, H, C_DT), F64)
            if MODE != 1:
                hp = _base(row + 2, j * n + start, H_DT, ALIGNED) + idx
                if STOCHASTIC:
                    # (j GOLDEN modulo 2^32: a compile-time constant)
                    seq_g = seq0_g + ((j * 0x9E3779B1) % 4294967296)
                    tl.store(hp, _to_bf16_stochastic(hn.to(tl.float32), seq_g), mask=mask)
                else:
                    _store(hp, hn, mask, H_DT, NATIVE_BF16)
            u = u + tl.load(w_ptr + 2 * H + H * H + j).to(C_DT) * hn
            s = s + tl.load(w_ptr + 3 * H + H * H + j).to(C_DT) * hn

        if MODE != 1:
            pp = _base(row, start, P_DT, ALIGNED)
            lr = tl.load(lr_ptr + tl.load(row + 6)).to(C_DT)  # by the tensor's call position
            theta = tl.load(pp + idx, mask=mask, other=0.0).to(C_DT)
            if MODE == 2:
                u = u + tl.load(shared_ptr).to(C_DT)
            _store(pp + idx, theta + lr * u, mask, P_DT, NATIVE_BF16)
        if MODE != 2:
            s = tl.where(mask, s, 0.0)
            tl.store(part_ptr + pid, tl.sum(s, axis=0).to(tl.float64))

    @triton.jit
    def _shift_kernel(tab, blk, lr_ptr, shared_ptr, skip_ptr, BLOCK: tl.constexpr,
                      P_DT: tl.constexpr, C_DT: tl.constexpr, HAS_SKIP: tl.constexpr,
                      ALIGNED: tl.constexpr):
        # pass 2 of fp32/fp64 parameters: theta += lr * shared
        pid, t, row, n, start, rem = _locate(blk, tab, BLOCK, ALIGNED)
        idx = tl.arange(0, BLOCK)
        mask = idx < rem
        if HAS_SKIP:
            mask = mask & (tl.load(skip_ptr) == 0)
        pp = _base(row, start, P_DT, ALIGNED)
        shared = tl.load(shared_ptr).to(C_DT)
        lr = tl.load(lr_ptr + tl.load(row + 6)).to(C_DT)
        theta = tl.load(pp + idx, mask=mask, other=0.0)
        tl.store(pp + idx, theta + lr * shared, mask=mask)

    @triton.jit
    def _ones_kernel(tab, norm_ptr, skip_ptr, C_DT: tl.constexpr, HAS_SKIP: tl.constexpr):
        # one c per tensor: c' = beta c + (1 - beta), after every program that reads c
        cp = tl.load(tab + tl.program_id(0) * 8 + 4).to(tl.pointer_type(C_DT))
        c = tl.load(cp) * tl.load(norm_ptr).to(C_DT) + tl.load(norm_ptr + 1).to(C_DT)
        if HAS_SKIP:
            tl.store(cp, c, mask=tl.load(skip_ptr) == 0)
        else:
            tl.store(cp, c)

    # (ints equal to 1 would otherwise become compile-time constants, with no .to())
    @triton.jit(do_not_specialize=["n_part", "n_total"])
    def _reduce_kernel(part_ptr, n_part, shared_ptr, n_total, R: tl.constexpr):
        # fixed-order sum of the partials: R interleaved fp64 accumulators, then a fixed tree
        acc = tl.zeros([R], dtype=tl.float64)
        for i in range(0, n_part, R):
            offs = i + tl.arange(0, R)
            acc += tl.load(part_ptr + offs, mask=offs < n_part, other=0.0)
        total = tl.sum(acc, axis=0)
        tl.store(shared_ptr, total / n_total.to(tl.float64))  # n_total: an int (exact)

    @triton.jit(do_not_specialize=["T"])
    def _segment_kernel(part_ptr, seg_ptr, out_ptr, T, R: tl.constexpr):
        # per tensor t: the sum of its blocks' partials, which are contiguous from
        # seg[t] (first block) for seg[T + t] blocks; a fixed order, as in _reduce_kernel
        t = tl.program_id(0)
        first = tl.load(seg_ptr + t)
        count = tl.load(seg_ptr + T + t)
        acc = tl.zeros([R], dtype=tl.float64)
        for i in range(0, count, R):
            offs = i + tl.arange(0, R)
            acc += tl.load(part_ptr + first + offs, mask=offs < count, other=0.0)
        tl.store(out_ptr + t, tl.sum(acc, axis=0))

    @triton.jit
    def _nonfinite_kernel(tab, blk, out_ptr, BLOCK: tl.constexpr, U_DT: tl.constexpr,
                          EXP: tl.constexpr, ALIGNED: tl.constexpr):
        # one block of one gradient: it holds a NaN or an Inf if a value's exponent bits are
        # all ones. The gradient is read as unsigned integers of its width: exact for every
        # float format, and free of the float conversions of Triton's interpreter (which
        # widens bf16 and narrows fp64 on the way). A bad block raises its tensor's flag (a
        # max: the same result in any order)
        pid, t, row, n, start, rem = _locate(blk, tab, BLOCK, ALIGNED)
        idx = tl.arange(0, BLOCK)
        u = tl.load(_base(row + 1, start, U_DT, ALIGNED) + idx, mask=idx < rem, other=0)
        bad = tl.max(((u & EXP) == EXP).to(tl.int32), axis=0)
        if bad != 0:
            tl.atomic_max(out_ptr + tl.load(row + 6), bad)

    @triton.jit(do_not_specialize=["n"])
    def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, F64: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(y_ptr + offs, _tanh(x, F64), mask=offs < n)
