# Development shell: Python 3.11, uv (which installs the locked environment), node for
# the dashboard, Chromium for its end-to-end tests. Then: bash scripts/test.sh
{ pkgs }:
pkgs.mkShell {
  packages = [
    pkgs.python311
    pkgs.uv
    pkgs.nodejs_20
    pkgs.chromium
    pkgs.git
  ];
  env = {
    UV_PYTHON_DOWNLOADS = "never";
    UV_PYTHON = "${pkgs.python311}/bin/python3.11";
  };
  shellHook = ''
    uv sync --frozen --quiet
    source .venv/bin/activate
  '';
}
