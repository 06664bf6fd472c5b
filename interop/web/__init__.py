"""Web pages for people: the radiologists' worklist (`/worklist`), served by the hub itself."""
