{
  description = "Aspen: a federated, local-first distributed store (Raft over redb, iroh QUIC)";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    rust-overlay = {
      url = "github:oxalica/rust-overlay";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, rust-overlay }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f (import nixpkgs {
        inherit system;
        overlays = [ rust-overlay.overlays.default ];
      }));
      cargoToml = builtins.fromTOML (builtins.readFile ./Cargo.toml);
      # The toolchain the workspace declares (Cargo.toml: workspace.package.rust-version).
      rustVersion = "${cargoToml.workspace.package.rust-version}.0";
      toolchain = pkgs: pkgs.rust-bin.stable.${rustVersion}.default.override {
        extensions = [ "rust-src" "clippy" "rustfmt" ];
      };
    in
    {
      # `nix build`: the `aspen` binary (crate aspen-node), dependencies from Cargo.lock.
      packages = forAllSystems (pkgs:
        let
          rust = toolchain pkgs;
          rustPlatform = pkgs.makeRustPlatform { cargo = rust; rustc = rust; };
        in
        {
          default = rustPlatform.buildRustPackage {
            pname = "aspen";
            version = cargoToml.workspace.package.version;
            src = ./.;
            cargoLock.lockFile = ./Cargo.lock;
            cargoBuildFlags = [ "-p" "aspen-node" ];
            # The tests start `aspen` processes and bind local ports: run them with
            # `cargo test --workspace` (the dev shell has everything they need).
            doCheck = false;
            meta.mainProgram = "aspen";
          };
        });

      # `nix develop`: the declared toolchain and what the tests use (git, bash).
      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [ (toolchain pkgs) pkgs.git pkgs.bash ];
        };
      });
    };
}
