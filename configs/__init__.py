# Config recipes import each other as a package (`from configs import base`); entry points put
# the folder holding `configs/` on sys.path, so this works from any working directory.
