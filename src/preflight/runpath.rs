//! Where a CUDA build's binary finds the libcuda stub at run time: its RUNPATH, which holds
//! only entries relative to the binary (`$ORIGIN`), never the build directory, so the same
//! bytes work from cargo's `target/<profile>/`, from the Nix package's `$out/bin` and from
//! an image. build.rs includes this file to emit the linker argument; the crate's tests
//! check the same values and read the RUNPATH of the binary actually built.

/// The stub's directory: beside the binary for cargo builds (build.rs copies it to
/// `target/<profile>/zopilot-stubs`), under `lib/` for installed ones (nix/package.nix).
pub const STUB_DIR_NAME: &str = "zopilot-stubs";

/// The binary's RUNPATH, in search order.
pub const RUNPATH: &[&str] = &["$ORIGIN/zopilot-stubs", "$ORIGIN/../lib/zopilot-stubs"];

/// What a RUNPATH entry may start with besides `$ORIGIN`: the Nix store (the package's
/// CUDA libraries; the store path is part of the runtime closure) and NixOS's driver
/// directory (nixpkgs' `autoAddDriverRunpath` adds it). Anything else, a build directory
/// above all, names a place that will not exist on the host that runs the binary, and
/// nixpkgs' fixup refuses `/build/` outright.
pub const ALLOWED_ABSOLUTE: &[&str] = &["/nix/store/", "/run/opengl-driver/lib"];

/// The RUNPATH entries that are neither `$ORIGIN`-relative nor under `ALLOWED_ABSOLUTE`.
pub fn foreign_entries(runpath: &str) -> Vec<&str> {
    runpath
        .split(':')
        .filter(|e| !e.is_empty())
        .filter(|e| !(*e == "$ORIGIN" || e.starts_with("$ORIGIN/") || e.starts_with("${ORIGIN}")))
        .filter(|e| !ALLOWED_ABSOLUTE.iter().any(|a| e.starts_with(a)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_rs_emits_only_origin_relative_entries() {
        assert!(foreign_entries(&RUNPATH.join(":")).is_empty());
        assert!(RUNPATH.iter().all(|e| e.starts_with("$ORIGIN/")));
    }

    #[test]
    fn build_directories_are_foreign() {
        let built = "$ORIGIN/zopilot-stubs:/build/source/target/release/build/x/out/zopilot-stubs:/nix/store/abc-cuda_cudart/lib:/run/opengl-driver/lib:/tmp/target-cuda/out";
        assert_eq!(
            foreign_entries(built),
            [
                "/build/source/target/release/build/x/out/zopilot-stubs",
                "/tmp/target-cuda/out"
            ]
        );
    }

    #[test]
    fn the_entries_name_where_the_stub_is_put() {
        // build.rs copies it to target/<profile>/zopilot-stubs, beside cargo's binaries.
        assert!(RUNPATH.contains(&format!("$ORIGIN/{STUB_DIR_NAME}").as_str()));
        // nix/package.nix installs it to $out/lib/zopilot-stubs, binaries being in $out/bin.
        let package = include_str!("../../nix/package.nix");
        assert!(package.contains(&format!("$out/lib/{STUB_DIR_NAME}/libcuda.so.1")));
        assert!(RUNPATH.contains(&format!("$ORIGIN/../lib/{STUB_DIR_NAME}").as_str()));
    }
}
