//! Which instruction set the kernels use, chosen once per process.
//!
//! [`simd_path`] picks the best path the CPU has, or the one named by the
//! `AIRLOCK_SIMD` environment variable (read once, at the first call). Each
//! name is exactly one instruction set; naming one the CPU lacks, or a name
//! that does not exist, is an error that [`simd_path`] returns and that every
//! [`crate::matmul`] call then returns too: never a silent fallback.

use std::fmt;
use std::sync::OnceLock;

use crate::KernelError;

/// The environment variable that forces a path.
pub const SIMD_ENV: &str = "AIRLOCK_SIMD";

/// One implementation of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimdPath {
    /// Portable Rust, the reference twin of every other path.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C: `vpmaddubsw` + `vpmaddwd` on 256 bits.
    Avx2,
    /// x86-64 AVX-VNNI (VEX): `vpdpbusd` on 256 bits, plus AVX2 + FMA + F16C.
    AvxVnni,
    /// x86-64 AVX-512F/BW on 512 bits (plus AVX2 + FMA + F16C).
    Avx512,
    /// x86-64 AVX-512 VNNI: `vpdpbusd` on 512 bits (plus AVX-512F/BW/VL).
    Avx512Vnni,
    /// aarch64 NEON (baseline there): `smull` + `sadalp` for the byte dot
    /// products.
    Neon,
    /// aarch64 NEON with the dot-product extension (FEAT_DotProd): `sdot`.
    NeonDotprod,
}

const ALL: [SimdPath; 7] = [
    SimdPath::Scalar,
    SimdPath::Avx2,
    SimdPath::AvxVnni,
    SimdPath::Avx512,
    SimdPath::Avx512Vnni,
    SimdPath::Neon,
    SimdPath::NeonDotprod,
];

impl SimdPath {
    /// Every path, available or not.
    pub fn all() -> &'static [SimdPath] {
        &ALL
    }

    /// The name `AIRLOCK_SIMD` takes and `airlock --version` prints.
    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Scalar => "scalar",
            SimdPath::Avx2 => "avx2",
            SimdPath::AvxVnni => "avxvnni",
            SimdPath::Avx512 => "avx512",
            SimdPath::Avx512Vnni => "avx512vnni",
            SimdPath::Neon => "neon",
            SimdPath::NeonDotprod => "neon-dotprod",
        }
    }

    pub fn from_name(name: &str) -> Option<SimdPath> {
        ALL.iter().copied().find(|p| p.name() == name)
    }

    /// True when this build has the path and the running CPU has every
    /// feature it uses.
    pub fn is_available(self) -> bool {
        match self {
            SimdPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => x86::avx2(),
            #[cfg(target_arch = "x86_64")]
            SimdPath::AvxVnni => x86::avx2() && std::arch::is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => x86::avx512(),
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512Vnni => {
                x86::avx512() && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
            SimdPath::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
            SimdPath::NeonDotprod => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            _ => false,
        }
    }

    /// The paths this CPU can run, scalar first.
    pub fn available() -> Vec<SimdPath> {
        ALL.iter().copied().filter(|p| p.is_available()).collect()
    }

    /// The fastest available path: wider and fused instructions first.
    pub fn best() -> SimdPath {
        use SimdPath::*;
        [Avx512Vnni, Avx512, AvxVnni, Avx2, NeonDotprod, Neon]
            .into_iter()
            .find(|p| p.is_available())
            .unwrap_or(Scalar)
    }

    /// The path for an `AIRLOCK_SIMD` value: `None` (unset or empty) picks
    /// the best; an unknown or unavailable name is an error.
    pub fn resolve(requested: Option<&str>) -> Result<SimdPath, KernelError> {
        let Some(name) = requested.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(SimdPath::best());
        };
        let known = || ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join("|");
        match SimdPath::from_name(name) {
            None => Err(KernelError::Simd(format!(
                "{SIMD_ENV}={name}: unknown path (expected one of {})",
                known()
            ))),
            Some(p) if !p.is_available() => Err(KernelError::Simd(format!(
                "{SIMD_ENV}={name}: this CPU or build does not support it (available: {})",
                SimdPath::available()
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            Some(p) => Ok(p),
        }
    }
}

impl fmt::Display for SimdPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::is_x86_feature_detected as has;

    pub fn avx2() -> bool {
        has!("avx2") && has!("fma") && has!("f16c")
    }

    pub fn avx512() -> bool {
        // VL: the F16/BF16 tiles use the 32 ymm registers (every CPU with BW has it).
        avx2() && has!("avx512f") && has!("avx512bw") && has!("avx512vl")
    }
}

static CHOSEN: OnceLock<Result<SimdPath, KernelError>> = OnceLock::new();

/// The path every kernel uses in this process: `AIRLOCK_SIMD` if set (an
/// error if it names an unknown or unavailable path), else
/// [`SimdPath::best`]. Decided at the first call and never again.
pub fn simd_path() -> Result<SimdPath, KernelError> {
    CHOSEN
        .get_or_init(|| {
            let env = std::env::var(SIMD_ENV).ok();
            SimdPath::resolve(env.as_deref())
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &p in SimdPath::all() {
            assert_eq!(SimdPath::from_name(p.name()), Some(p));
        }
        assert_eq!(SimdPath::from_name("AVX2"), None);
    }

    #[test]
    fn resolve_rules() {
        assert_eq!(SimdPath::resolve(None), Ok(SimdPath::best()));
        assert_eq!(SimdPath::resolve(Some("")), Ok(SimdPath::best()));
        assert_eq!(SimdPath::resolve(Some("scalar")), Ok(SimdPath::Scalar));
        let e = SimdPath::resolve(Some("sse9")).unwrap_err();
        assert!(e.to_string().contains("unknown path"), "{e}");
        for &p in SimdPath::all() {
            match SimdPath::resolve(Some(p.name())) {
                Ok(q) => assert!(p.is_available() && q == p),
                Err(e) => {
                    assert!(!p.is_available());
                    assert!(e.to_string().contains("does not support"), "{e}");
                }
            }
        }
        // NEON is never available on x86; it is baseline on aarch64, where
        // the x86 paths never are.
        #[cfg(target_arch = "x86_64")]
        {
            assert!(SimdPath::resolve(Some("neon")).is_err());
            assert!(SimdPath::resolve(Some("neon-dotprod")).is_err());
        }
        #[cfg(target_arch = "aarch64")]
        {
            assert_eq!(SimdPath::resolve(Some("neon")), Ok(SimdPath::Neon));
            assert!(SimdPath::resolve(Some("avx2")).is_err());
            assert!(matches!(
                SimdPath::best(),
                SimdPath::Neon | SimdPath::NeonDotprod
            ));
        }
        assert!(SimdPath::available().contains(&SimdPath::best()));
    }

    /// The child half of `env_var_surfaces_through_matmul`: does nothing
    /// unless spawned by it with `AIRLOCK_SIMD` set.
    #[test]
    fn env_child() {
        let Ok(expect) = std::env::var("AIRLOCK_SIMD_TEST_EXPECT") else {
            return;
        };
        let w = crate::WeightView {
            ty: crate::GgmlType::Q8_0,
            data: &[0u8; 34],
            rows: 1,
            cols: 32,
        };
        let mut y = [0f32];
        let r = crate::matmul(&w, &[1.0; 32], 1, &mut y, &mut Vec::new());
        match simd_path() {
            Ok(p) => {
                assert_eq!(p.name(), expect);
                r.unwrap();
            }
            Err(e) => {
                assert_eq!(expect, "error");
                assert_eq!(r, Err(e.clone()));
                println!("{e}");
            }
        }
        println!("CHILD-OK");
    }

    #[test]
    fn env_var_surfaces_through_matmul() {
        let missing = SimdPath::all().iter().find(|p| !p.is_available()).unwrap();
        for (val, expect) in [
            (missing.name(), "error"),
            ("bogus", "error"),
            ("scalar", "scalar"),
            (SimdPath::best().name(), SimdPath::best().name()),
        ] {
            // Under an emulator (scripts/test-aarch64.sh sets AIRLOCK_TEST_RUNNER=qemu-aarch64)
            // the child must be started through it too.
            let exe = std::env::current_exe().unwrap();
            let mut cmd = match std::env::var_os("AIRLOCK_TEST_RUNNER") {
                Some(runner) => {
                    let mut c = std::process::Command::new(runner);
                    c.arg(&exe);
                    c
                }
                None => std::process::Command::new(&exe),
            };
            let out = cmd
                .args(["--exact", "simd::tests::env_child", "--nocapture"])
                .env(SIMD_ENV, val)
                .env("AIRLOCK_SIMD_TEST_EXPECT", expect)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("CHILD-OK"),
                "{SIMD_ENV}={val}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            if expect == "error" {
                assert!(text.contains(&format!("{SIMD_ENV}={val}")), "{text}");
            }
        }
    }
}
