//! What the CPU and the OS allow, and which instruction set the kernels use.
//!
//! Detection reads CPUID and XCR0 directly (not `is_x86_feature_detected!`, which cannot
//! name AMX on stable Rust). An ISA counts as available only when the CPU has it *and*
//! the OS saves its register state (XCR0), and for AMX also when Linux granted this
//! process permission to use tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM)`).

use crate::error::{KtrsError, Result};
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// CPU features relevant to ktrs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512bf16: bool,
    pub avx512vnni: bool,
    pub amx_tile: bool,
    pub amx_bf16: bool,
    pub amx_int8: bool,
    /// XCR0 says the OS saves xmm and ymm state.
    pub os_avx: bool,
    /// XCR0 says the OS saves opmask and zmm state.
    pub os_avx512: bool,
    /// XCR0 says the OS saves tile config and tile data.
    pub os_amx: bool,
}

impl CpuFeatures {
    /// Reads CPUID and XCR0 once per process.
    pub fn get() -> CpuFeatures {
        static CACHE: OnceLock<CpuFeatures> = OnceLock::new();
        *CACHE.get_or_init(detect)
    }

    /// What the AVX2 tier needs: 256-bit integer ops (bf16 widening), FMA, and F16C
    /// (present on every AVX2 CPU; required so the tier names one fixed feature set).
    pub fn has_avx2_kernels(&self) -> bool {
        self.avx2 && self.fma && self.f16c && self.os_avx
    }

    /// AVX-512 F/BW/VL without BF16 (Skylake-SP to Ice Lake Xeons): the `avx512f` tier
    /// widens bf16 like `avx2` and uses the AVX2 helpers too.
    pub fn has_avx512f_kernels(&self) -> bool {
        self.avx512f && self.avx512bw && self.avx512vl && self.os_avx512 && self.has_avx2_kernels()
    }

    pub fn has_avx512_kernels(&self) -> bool {
        self.avx512f && self.avx512bw && self.avx512vl && self.avx512bf16 && self.os_avx512
    }

    pub fn has_amx_hardware(&self) -> bool {
        self.amx_tile && self.amx_bf16 && self.os_amx && self.has_avx512_kernels()
    }

    /// Feature names present, in a fixed order.
    pub fn names(&self) -> Vec<&'static str> {
        let all = [
            ("avx2", self.avx2),
            ("fma", self.fma),
            ("f16c", self.f16c),
            ("avx512f", self.avx512f),
            ("avx512bw", self.avx512bw),
            ("avx512vl", self.avx512vl),
            ("avx512bf16", self.avx512bf16),
            ("avx512vnni", self.avx512vnni),
            ("amx-tile", self.amx_tile),
            ("amx-bf16", self.amx_bf16),
            ("amx-int8", self.amx_int8),
        ];
        all.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect()
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 7 {
        return CpuFeatures::default();
    }
    let l1 = __cpuid(1);
    let l7 = __cpuid_count(7, 0);
    let l7_1 = __cpuid_count(7, 1);
    let osxsave = l1.ecx & (1 << 27) != 0;
    // SAFETY: XGETBV is only executed when CPUID says OSXSAVE is enabled.
    let xcr0 = if osxsave { unsafe { _xgetbv(0) } } else { 0 };
    let bit = |r: u32, b: u32| r & (1 << b) != 0;
    CpuFeatures {
        avx2: bit(l7.ebx, 5),
        fma: bit(l1.ecx, 12),
        f16c: bit(l1.ecx, 29),
        avx512f: bit(l7.ebx, 16),
        avx512bw: bit(l7.ebx, 30),
        avx512vl: bit(l7.ebx, 31),
        avx512vnni: bit(l7.ecx, 11),
        avx512bf16: bit(l7_1.eax, 5),
        amx_bf16: bit(l7.edx, 22),
        amx_tile: bit(l7.edx, 24),
        amx_int8: bit(l7.edx, 25),
        // SSE (1) and AVX (2) state.
        os_avx: xcr0 & 0x6 == 0x6,
        // opmask (5), upper zmm halves (6), zmm16-31 (7), plus SSE/AVX (1, 2).
        os_avx512: xcr0 & 0xe6 == 0xe6,
        // XTILECFG (17) and XTILEDATA (18).
        os_amx: xcr0 & (0b11 << 17) == (0b11 << 17),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures::default()
}

/// Outcome of asking Linux for AMX tile-data permission (once per process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmxPermission {
    Granted,
    Refused(String),
    NoHardware,
}

/// Requests `XTILEDATA` permission once; later calls return the first answer.
pub fn amx_permission() -> AmxPermission {
    static CACHE: OnceLock<AmxPermission> = OnceLock::new();
    CACHE.get_or_init(request_amx_permission).clone()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx_permission() -> AmxPermission {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    if !CpuFeatures::get().has_amx_hardware() {
        return AmxPermission::NoHardware;
    }
    // SAFETY: a plain syscall with integer arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if rc == 0 {
        AmxPermission::Granted
    } else {
        let err = std::io::Error::last_os_error();
        AmxPermission::Refused(format!(
            "arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: {err}"
        ))
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_amx_permission() -> AmxPermission {
    AmxPermission::NoHardware
}

/// The instruction set the kernels use, slowest first (`Ord` is the dispatch preference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust; the reference every other path is tested against.
    Scalar,
    /// AVX2 + FMA (+ F16C): bf16 widened to f32 in ymm registers, FMA into f32.
    Avx2,
    /// AVX-512 F/BW without BF16: as `Avx2` with 16-lane zmm registers.
    Avx512f,
    /// AVX-512 BF16 (`vdpbf16ps`).
    Avx512,
    /// AMX-BF16 tiles (with AVX-512 for the small parts).
    Amx,
}

/// Per tier: name, accepted spellings, and what it means for speed (`ktrs info`).
const TIERS: [(Isa, &str, &[&str], &str); 5] = [
    (
        Isa::Scalar,
        "scalar",
        &[],
        "portable code, the reference: several times slower than any vector tier (V2-Lite layer, T=32, 2 cores: ~1.1 s forward+backward against ~0.3 s with avx2)",
    ),
    (
        Isa::Avx2,
        "avx2",
        &["avx2+fma", "avx2fma"],
        "8-lane f32 FMA on bf16 widened in registers (AMD Zen 1-3, Intel client cores, Xeons before Skylake-SP): GEMMs at ~70% of the core's 256-bit FMA peak, few-token calls at DRAM speed",
    ),
    (
        Isa::Avx512f,
        "avx512f",
        &["avx512-f", "avx512fbw"],
        "16-lane f32 FMA on bf16 widened in registers (Xeons Skylake-SP to Ice Lake: AVX-512 without BF16): about 1.7x avx2's GEMM rate per core",
    ),
    (
        Isa::Avx512,
        "avx512",
        &["avx512bf16", "avx-512"],
        "AVX-512 BF16 dot products (vdpbf16ps; Zen 4, Cooper Lake and later)",
    ),
    (
        Isa::Amx,
        "amx",
        &["amx-bf16", "amxbf16"],
        "AMX-BF16 tiles for experts with many rows: the fastest for training-sized batches",
    ),
];

impl Isa {
    pub const ALL: [Isa; 5] = [Isa::Scalar, Isa::Avx2, Isa::Avx512f, Isa::Avx512, Isa::Amx];

    fn tier(self) -> &'static (Isa, &'static str, &'static [&'static str], &'static str) {
        TIERS
            .iter()
            .find(|t| t.0 == self)
            .expect("every Isa has a tier row")
    }

    pub fn name(self) -> &'static str {
        self.tier().1
    }

    /// One line on what running this tier means for speed.
    pub fn describe(self) -> &'static str {
        self.tier().3
    }

    /// Ok when this ISA can run here; otherwise the reason it cannot.
    pub fn check_available(self) -> Result<()> {
        let f = CpuFeatures::get();
        let unavailable = |reason: &str| {
            Err(KtrsError::IsaUnavailable {
                isa: self.name().into(),
                reason: reason.into(),
            })
        };
        match self {
            Isa::Scalar => Ok(()),
            Isa::Avx2 if f.has_avx2_kernels() => Ok(()),
            Isa::Avx2 => unavailable("the CPU or OS lacks AVX2/FMA/F16C"),
            Isa::Avx512f if f.has_avx512f_kernels() => Ok(()),
            Isa::Avx512f => unavailable("the CPU or OS lacks AVX-512 F/BW/VL (or AVX2/FMA/F16C)"),
            Isa::Avx512 if f.has_avx512_kernels() => Ok(()),
            Isa::Avx512 => unavailable("the CPU or OS lacks AVX-512 F/BW/VL/BF16"),
            Isa::Amx => {
                if !f.has_amx_hardware() {
                    return unavailable("the CPU or OS lacks AMX-TILE/AMX-BF16 (or AVX-512 BF16)");
                }
                if !crate::kernels::amx_kernels_built() {
                    return unavailable("this build of ktrs has no AMX kernels yet; use avx512");
                }
                match amx_permission() {
                    AmxPermission::Granted => Ok(()),
                    AmxPermission::Refused(why) => unavailable(&why),
                    AmxPermission::NoHardware => unavailable("no AMX hardware"),
                }
            }
        }
    }

    pub fn available() -> Vec<Isa> {
        Isa::ALL
            .iter()
            .copied()
            .filter(|i| i.check_available().is_ok())
            .collect()
    }

    /// The fastest available ISA.
    pub fn best() -> Isa {
        *Isa::available().last().expect("scalar is always available")
    }

    /// `KTRS_ISA` if set (an error if it names an unknown or unavailable ISA), else the best.
    pub fn from_env_or_best() -> Result<Isa> {
        match std::env::var("KTRS_ISA") {
            Ok(v) if !v.trim().is_empty() && v.trim() != "auto" => {
                let isa: Isa = v.trim().parse().map_err(|_| {
                    KtrsError::invalid(
                        "KTRS_ISA",
                        format!("one of {}, auto", names()),
                        format!("{v:?}"),
                    )
                })?;
                isa.check_available()?;
                Ok(isa)
            }
            _ => Ok(Isa::best()),
        }
    }
}

/// "scalar, avx2, ..." for error messages.
fn names() -> String {
    Isa::ALL.map(Isa::name).join(", ")
}

impl FromStr for Isa {
    type Err = KtrsError;
    fn from_str(s: &str) -> Result<Isa> {
        let s = s.to_ascii_lowercase();
        TIERS
            .iter()
            .find(|(_, name, aliases, _)| *name == s || aliases.contains(&s.as_str()))
            .map(|t| t.0)
            .ok_or_else(|| {
                KtrsError::invalid("isa", format!("one of {}", names()), format!("{s:?}"))
            })
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Physical cores this process may run on (SMT siblings counted once).
pub fn physical_cores() -> usize {
    let allowed = allowed_cpus();
    let mut seen = std::collections::BTreeSet::new();
    for cpu in &allowed {
        let base = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let pkg =
            std::fs::read_to_string(format!("{base}/physical_package_id")).unwrap_or_default();
        let core =
            std::fs::read_to_string(format!("{base}/core_id")).unwrap_or_else(|_| cpu.to_string());
        seen.insert((pkg.trim().to_string(), core.trim().to_string()));
    }
    seen.len().max(1)
}

/// Logical CPUs in this process's affinity mask.
pub fn allowed_cpus() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
                let v: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| libc::CPU_ISSET(c, &set))
                    .collect();
                if !v.is_empty() {
                    return v;
                }
            }
        }
    }
    (0..std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_availability() {
        assert_eq!("AVX512".parse::<Isa>().unwrap(), Isa::Avx512);
        assert_eq!("avx2".parse::<Isa>().unwrap(), Isa::Avx2);
        assert_eq!("AVX512F".parse::<Isa>().unwrap(), Isa::Avx512f);
        assert!("sse".parse::<Isa>().is_err());
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
        }
        let mut sorted = Isa::ALL;
        sorted.sort();
        assert_eq!(
            sorted,
            Isa::ALL,
            "ALL lists tiers in dispatch preference order"
        );
        assert!(Isa::Scalar.check_available().is_ok());
        let avail = Isa::available();
        assert_eq!(avail[0], Isa::Scalar);
        assert_eq!(Isa::best(), *avail.last().unwrap());
        // Agreement with std's detector where std can name the feature.
        #[cfg(target_arch = "x86_64")]
        {
            let f = CpuFeatures::get();
            assert_eq!(
                f.avx512f && f.os_avx512,
                is_x86_feature_detected!("avx512f")
            );
            assert_eq!(
                f.avx512bf16 && f.os_avx512,
                is_x86_feature_detected!("avx512bf16")
            );
            assert_eq!(
                f.has_avx2_kernels(),
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            );
        }
        assert!(physical_cores() >= 1);
    }
}
