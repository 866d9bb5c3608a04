from cxrtool.cli import main

main()
