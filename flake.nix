{
  description = "exo: pool Macs, NVIDIA boxes and CPUs into one LLM inference service";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    flake-utils.url = "github:numtide/flake-utils";
  };

  outputs = { self, nixpkgs, flake-utils }:
    flake-utils.lib.eachDefaultSystem (system:
      let
        pkgs = import nixpkgs { inherit system; config.allowUnfree = true; };
      in
      {
        devShells.default = import ./nix/shell.nix { inherit pkgs; };
        packages.default = import ./nix/package.nix { inherit pkgs; src = self; };
        apps.default = {
          type = "app";
          program = "${self.packages.${system}.default}/bin/exo";
        };
      });
}
