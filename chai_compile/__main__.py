from chai_compile.cli import main

main()
