{
  description = "zopilot-gpu: Mixtral-8x7B-Instruct quantized in situ to 4 bits, served from one GPU";

  inputs = {
    # nixos-25.11: CUDA 12.8 package set, rustc >= 1.88 (Cargo.toml's rust-version).
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";
    crane.url = "github:ipetkov/crane";
    # The Rust toolchain CI uses (rustc 1.95.0), not nixpkgs' rustc of the day.
    rust-overlay = {
      url = "github:oxalica/rust-overlay";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      crane,
      rust-overlay,
    }:
    let
      system = "x86_64-linux";
      inherit (nixpkgs) lib;

      # Admit NVIDIA's CUDA licences and nothing else that is unfree.
      isCudaLicence = licence: lib.elem (licence.shortName or "") [ "CUDA EULA" ];
      pkgs = import nixpkgs {
        inherit system;
        overlays = [ rust-overlay.overlays.default ];
        config.allowUnfreePredicate =
          pkg: builtins.all isCudaLicence (lib.toList (pkg.meta.license or [ ]));
      };

      # The same rustc as .ci/run's, so the flake builds what CI has tested.
      craneLib = (crane.mkLib pkgs).overrideToolchain (p: p.rust-bin.stable."1.95.0".default);
      # sm_120 (RTX 5090) needs CUDA >= 12.8.
      cudaPackages = pkgs.cudaPackages_12_8;
      rev = self.shortRev or self.dirtyShortRev or "unknown";

      build =
        args:
        pkgs.callPackage ./nix/package.nix (
          {
            inherit craneLib cudaPackages rev;
          }
          // args
        );

      # Compute capability per GPU family; `default` is the RTX 5090.
      capabilities = {
        default = "12.0";
        sm90 = "9.0";
        sm89 = "8.9";
        sm80 = "8.0";
      };
      gpuPackages = lib.mapAttrs (
        _: cudaCapability:
        build {
          cudaSupport = true;
          inherit cudaCapability;
        }
      ) capabilities;
      cpu = build { cudaSupport = false; };

      image =
        zopilot:
        pkgs.callPackage ./nix/image.nix {
          inherit zopilot rev;
          cudaVersion = cudaPackages.cudaMajorMinorVersion;
        };
      images = lib.mapAttrs' (
        name: pkg: lib.nameValuePair (if name == "default" then "image" else "image-${name}") (image pkg)
      ) gpuPackages;
    in
    {
      packages.${system} = gpuPackages // images // { inherit cpu; };

      apps.${system}.default = {
        type = "app";
        program = "${gpuPackages.default}/bin/zopilot-gpu";
        meta.description = "zopilot-gpu serve (RTX 5090 build)";
      };

      # Everything the RTX 5090 package builds with (nvcc, cudart, cuBLAS, cuRAND, NVRTC and
      # the variables its build scripts read), so `cargo build --features cuda` works here.
      devShells.${system}.default = craneLib.devShell {
        inputsFrom = [ gpuPackages.default ];
        packages = [
          pkgs.nixfmt
          pkgs.python3
        ];
        inherit (gpuPackages.default.passthru.cudaEnv)
          CUDA_COMPUTE_CAP
          CUDA_ROOT
          CUDA_PATH
          CUDA_HOME
          CUDAFORGE_THREADS
          ;
      };

      checks.${system} = cpu.passthru.checks // {
        nix-format = pkgs.runCommand "nix-format" { nativeBuildInputs = [ pkgs.nixfmt ]; } ''
          nixfmt --check ${./flake.nix} ${./nix}/*.nix
          touch $out
        '';
      };

      formatter.${system} = pkgs.nixfmt;
    };
}
