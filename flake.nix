{
  description = "zopilot-gpu: Mixtral-8x7B-Instruct quantized in situ to 4 bits, served from one GPU";

  inputs = {
    # nixos-25.11: CUDA 12.8 package set, rustc >= 1.88 (Cargo.toml's rust-version).
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";
    crane.url = "github:ipetkov/crane";
  };

  outputs =
    {
      self,
      nixpkgs,
      crane,
    }:
    let
      system = "x86_64-linux";
      inherit (nixpkgs) lib;

      # Admit NVIDIA's CUDA licences and nothing else that is unfree.
      isCudaLicence = licence: lib.elem (licence.shortName or "") [ "CUDA EULA" ];
      pkgs = import nixpkgs {
        inherit system;
        config.allowUnfreePredicate =
          pkg: builtins.all isCudaLicence (lib.toList (pkg.meta.license or [ ]));
      };

      craneLib = crane.mkLib pkgs;
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

      devShells.${system}.default = craneLib.devShell {
        packages = [
          cudaPackages.cuda_nvcc
          pkgs.nixfmt-rfc-style
          pkgs.python3
        ];
        CUDA_COMPUTE_CAP = "120";
      };

      checks.${system} = cpu.passthru.checks // {
        nix-format =
          pkgs.runCommand "nix-format" { nativeBuildInputs = [ pkgs.nixfmt-rfc-style ]; }
            ''
              nixfmt --check ${./flake.nix} ${./nix}/*.nix
              touch $out
            '';
      };

      formatter.${system} = pkgs.nixfmt-rfc-style;
    };
}
